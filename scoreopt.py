"""Score-optimal diffusion schedules: the cost of a step, the path length, the optimal schedule.

Reference implementation of C. Williams, A. Campbell, A. Doucet, S. Syed, *Score-Optimal
Diffusion Schedules*, NeurIPS 2024 (arXiv:2412.07877).

**Part I** is the paper, in its order, and stands alone: cut this file at the line that
begins ``# PART II`` and what is above still runs every quantity the paper defines
(processes, the corrector and predictor costs, the local cost, the path length and its
inverse, Algorithms 1 and 2), with the exact local cost for Gaussian data to check a copy against.
**Part II** is what this project derives or adds (``docs/derivations.md``): the control variate
for Gaussian data, the equal-cost fixed point, the budgeted and parallel schedule map with error
bars, adapters and exports for a user's model, the map file and a command line.

Conventions (stated once): time ``t`` runs over ``[t_min, t_max]``; ``t = 0`` is the data
end and noise grows with ``t``. A *schedule* ``ts`` is a 1-D float64 array of ``T + 1``
strictly increasing times with ``ts[0] == t_min`` and ``ts[-1] == t_max`` exactly; sampling
walks it backwards. Marginals are ``x_t = s(t) x_0 + sigma(t) eps``. A score is any callable
``score(x, t)`` with ``x`` of shape ``(n, d)`` and ``t`` a float (or one time per row, an
array ``(n,)``, where a function says so) returning ``(n, d)``; ``rng`` is a
``numpy.random.Generator`` or an int seed.

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
"""

import hashlib
import math
import warnings
from functools import partial
from typing import Callable, NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, make_jvp
from autograd.tracer import getval
from scipy.interpolate import PchipInterpolator

__all__ = [
    "Process", "ve", "vp_linear", "vp_cosine", "nsr", "time_from_nsr",
    "uniform_schedule", "edm_schedule", "cosine_schedule",
    "Estimate", "ScoreEvaluationError", "corrector_cost", "ddim_coefficients", "predictor_cost", "interval_costs",
    "local_cost", "central_difference", "forward_mode", "gaussian_local_cost",
    "cumulative_cost", "optimal_schedule", "update_schedule", "path_length", "path_energy",
    "blend", "OnlineUpdate", "online_update", "grid_route", "interval_route",
]

# The checks at the end of Part I (check_*, as_rng, as_real_array, as_column, resolve, nsr_range,
# checked_score, noised, mean_stderr) are shared by sampler.py and models.py, which import them by
# name; they are not part of the documented API and are left out of __all__.


# ================================================================================
# PART I. THE PAPER
# ================================================================================

# -- Processes and their noise-to-signal ratio -----------------------------------

class Process(NamedTuple):
    """A forward noising process with marginals ``x_t = s(t) x_0 + sigma(t) eps`` (paper, Sec. 2).

    ``s`` and ``sigma`` are functions of ``t`` written with ``autograd.numpy``, differentiable in ``t``; the
    SDE ``dX = f X dt + g dW`` (:meth:`drift`, :meth:`diffusion_sq`) has these marginals. ``nu = sigma / s``
    increases from ``t_min`` to ``t_max``. ``name`` identifies it (a score built for another process is
    refused, :func:`checked_score`); ``n_timesteps`` is a discrete-time model's table length (0 otherwise).

    >>> p = ve()
    >>> round(float(p.nsr(0.5)), 4), p.t_min, p.t_max
    (0.4, 0.0, 1.0)
    """
    s: Callable
    sigma: Callable
    t_min: float
    t_max: float
    name: str = "process"
    n_timesteps: int = 0

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
    """Variance exploding: ``s = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t`` on ``[0, 1]``, EDM's range.

    Uniform ``t`` is uniform in ``log sigma``: a choice of coordinates, on which nothing optimal depends.

    >>> ve().name, [round(float(ve().sigma(t)), 3) for t in (0.0, 1.0)]
    ('ve(0.002, 80)', [0.002, 80.0])
    """
    sigma_min, sigma_max = check_positive(sigma_min, "sigma_min"), check_positive(sigma_max, "sigma_max")
    if not sigma_min < sigma_max:
        raise ValueError("`sigma_min` must be smaller than `sigma_max`")
    return Process(_one, partial(_geometric, sigma_min, math.log(sigma_max / sigma_min)), 0.0, 1.0,
                   f"ve({sigma_min:g}, {sigma_max:g})")


def _vp_linear_log_s(beta_min, beta_max, t):
    return -0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2)


def _exp_of(log_s, t):
    return anp.exp(log_s(t))


def _vp_sigma_from_log_s(log_s, t):
    return anp.sqrt(-anp.expm1(2.0 * log_s(t)))


def vp_linear(beta_min=0.1, beta_max=20.0, t_min=1e-3):
    """Variance preserving, ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021): ``s(t) =
    exp(-1/2 int_0^t beta)``, ``sigma = sqrt(1 - s^2)`` on ``[t_min, 1]``, the process of the paper's 1-D
    experiments, whose uniform schedule is its "linear" one.

    >>> p = vp_linear()
    >>> round(float(p.s(1.0)), 5), round(float(p.nsr(1.0)), 1)
    (0.00657, 152.2)
    """
    beta_min, beta_max = check_positive(beta_min, "beta_min"), check_positive(beta_max, "beta_max")
    t_min = check_positive(t_min, "t_min")
    if not t_min < 1.0:
        raise ValueError("`t_min` must be smaller than 1")
    log_s = partial(_vp_linear_log_s, beta_min, beta_max)
    return Process(partial(_exp_of, log_s), partial(_vp_sigma_from_log_s, log_s), t_min, 1.0,
                   f"vp_linear({beta_min:g}, {beta_max:g})")


def _cosine_log_s(offset, log_cos0, t):
    return anp.log(anp.cos((t + offset) / (1.0 + offset) * np.pi / 2.0)) - log_cos0


def vp_cosine(offset=0.008, t_min=1e-3, t_max=0.99):
    """Variance preserving with iDDPM's cosine ``alpha_bar`` (Nichol & Dhariwal 2021): ``s = sqrt(alpha_bar)``,
    ``alpha_bar(t) = cos^2(((t + offset)/(1 + offset)) pi/2) / cos^2((offset/(1 + offset)) pi/2)``, ``sigma =
    sqrt(1 - s^2)``; ``t_max`` stays below 1, where ``s = 0`` (0.99 gives ``nu_max`` 64).

    >>> round(float(vp_cosine().nsr(0.99)), 1)
    64.2
    """
    offset = check_positive(offset, "offset")
    t_min, t_max = check_real(t_min, "t_min"), check_real(t_max, "t_max")
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError("need 0 < `t_min` < `t_max` < 1 for vp_cosine")
    log_s = partial(_cosine_log_s, offset, math.log(math.cos(offset / (1.0 + offset) * math.pi / 2.0)))
    return Process(partial(_exp_of, log_s), partial(_vp_sigma_from_log_s, log_s), t_min, t_max,
                   f"vp_cosine({offset:g})")


def nsr(process, ts):
    """Noise-to-signal ratio ``nu = sigma / s`` at the times ``ts`` (finite, in the process range).

    >>> nsr(ve(), [0.0, 1.0]).round(9).tolist()
    [0.002, 80.0]
    """
    process = check_process(process)
    return np.asarray(process.nsr(check_times(ts, process, "ts")), dtype=float)


def time_from_nsr(process, nu):
    """The times at which the process has noise-to-signal ratio ``nu``, the inverse of :func:`nsr`: bisection
    in ``t`` on ``log nu(t)`` to float64 resolution, monotone, and exact at the ends (``nu`` within 1e-9 of
    ``nu(t_min)`` or ``nu(t_max)``, relative, maps to the endpoint).

    >>> p = vp_linear()
    >>> t = time_from_nsr(p, [1.0, 10.0])
    >>> np.allclose(nsr(p, t), [1.0, 10.0], rtol=1e-12)
    True
    """
    process = check_process(process)
    nu = as_real_array(nu, "nu")
    nu_lo, nu_hi = nsr_range(process)
    bad = ~(np.isfinite(nu) & (nu >= nu_lo * (1 - 1e-9)) & (nu <= nu_hi * (1 + 1e-9)))
    if np.any(bad):
        raise ValueError(f"`nu` must be finite and lie in the process range [{nu_lo:.6g}, {nu_hi:.6g}], got "
                         f"{nu[bad].flat[0]}")
    return _time_from_nsr(process, nu)


def _time_from_nsr(process, nu):
    nu_lo, nu_hi = nsr_range(process)
    target = np.log(nu)
    lo, hi = np.full(nu.shape, float(process.t_min)), np.full(nu.shape, float(process.t_max))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        below = np.log(process.nsr(mid)) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        if np.all(hi - lo <= 2 * np.spacing(np.maximum(abs(hi), 1.0))):
            break
    t = np.where(nu <= nu_lo * (1 + 1e-9), process.t_min, 0.5 * (lo + hi))
    return np.where(nu >= nu_hi * (1 - 1e-9), process.t_max, t)


def _schedule_from_nsr(process, nu):
    """Noise levels (any order) as an increasing schedule with exact endpoints."""
    ts = _pin(_time_from_nsr(process, np.sort(nu)), process.t_min, process.t_max)
    if not np.all(np.diff(ts) > 0):
        raise ValueError("the noise levels map to coinciding times; use fewer steps")
    return ts


def _pin(ts, lo, hi):
    """``ts`` as a new float array with its endpoints set to ``lo`` and ``hi`` exactly."""
    return np.concatenate([[lo], np.asarray(ts, dtype=float)[1:-1], [hi]])


# -- Schedules the paper compares with -------------------------------------------

def uniform_schedule(process, T):
    """Uniform in ``t``: the paper's "linear" schedule for a VP process.

    >>> uniform_schedule(ve(), 4).tolist()
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    process, T = check_process(process), check_int(T, "T", 1)
    return _pin(np.linspace(process.t_min, process.t_max, T + 1), process.t_min, process.t_max)


def edm_schedule(process, T, rho=7.0):
    """EDM's schedule (Karras et al. 2022), the paper's Eq. (22) (its experiments compare rho = 3, 7, 100):
    ``nu_i = (nu_max^(1/rho) + (i/T)(nu_min^(1/rho) - nu_max^(1/rho)))^rho``, mapped to ``t``.

    >>> [round(v, 3) for v in nsr(ve(), edm_schedule(ve(), 2)).tolist()]
    [0.002, 2.515, 80.0]
    """
    process, T, rho = check_process(process), check_int(T, "T", 1), check_positive(rho, "rho")
    nu_min, nu_max = nsr_range(process)
    u = np.arange(T + 1) / T
    return _schedule_from_nsr(process, (nu_max ** (1 / rho) + u * (nu_min ** (1 / rho) - nu_max ** (1 / rho))) ** rho)


def cosine_schedule(process, T, offset=0.008):
    """iDDPM's cosine noise levels (Nichol & Dhariwal 2021), mapped to ``t``: the paper's initial schedule for
    online training. ``alpha_bar(u) = cos^2(((u + offset)/(1 + offset)) pi/2) / cos^2((offset/(1 + offset)) pi/2)``
    gives ``nu(u) = sqrt(1/alpha_bar - 1)``, ``u`` uniform between where it meets ``nu_min`` and ``nu_max``.

    >>> np.allclose(cosine_schedule(vp_cosine(), 4), uniform_schedule(vp_cosine(), 4), atol=1e-9)
    True
    """
    process, T, offset = check_process(process), check_int(T, "T", 1), check_positive(offset, "offset")
    nu_min, nu_max = nsr_range(process)
    cos0 = np.cos(offset / (1.0 + offset) * np.pi / 2.0)
    # alpha_bar = 1 / (1 + nu^2)  <=>  cos(theta) = cos0 / sqrt(1 + nu^2)
    theta_lo, theta_hi = np.arccos(cos0 / np.sqrt(1.0 + np.array([nu_min, nu_max]) ** 2))
    nu = np.sqrt(np.maximum(cos0 ** 2 / np.cos(np.linspace(theta_lo, theta_hi, T + 1)) ** 2 - 1.0, 0.0))
    nu[0], nu[-1] = nu_min, nu_max
    return _schedule_from_nsr(process, nu)


# -- The cost of one step: corrector- and predictor-optimised --------------------

class Estimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error (floats, or arrays of one shape)."""
    value: object
    stderr: object


def noised(process, x0, t, rng):
    """A draw of ``x_t = s(t) x0 + sigma(t) eps``, fresh ``eps`` (``t`` a float)."""
    return float(process.s(t)) * x0 + float(process.sigma(t)) * rng.standard_normal(x0.shape)


def mean_stderr(values):
    """Monte-Carlo mean and standard error over the last axis (floats for 1-D input)."""
    mean, stderr = np.mean(values, axis=-1), np.std(values, axis=-1, ddof=1) / np.sqrt(values.shape[-1])
    return Estimate(float(mean), float(stderr)) if np.ndim(values) == 1 else Estimate(mean, stderr)


def corrector_cost(score, process, t_cur, t_next, x0, rng, *, velocity=None):
    """Corrector-optimised cost ``L_c(t, t') = v(t')^2 E_{x ~ p_t} ||S(x, t') - S(x, t)||^2`` (paper, Sec. 3).

    The predictor is the identity (annealed Langevin, the paper's Example 2.1) and a Langevin corrector at speed
    ``v(t')`` carries ``p_t`` to ``p_t'``: both scores at one ``x = s(t) x0 + sigma(t) eps`` (fresh ``eps`` per
    interval), ``t = t_cur``, ``t' = t_next``. ``t_cur``, ``t_next``: floats or arrays of one shape (one interval
    each). ``x0``: data ``(n, d)``, ``n >= 2``. ``velocity``: ``v(t)``, default ``sigma``. Returns an
    :class:`Estimate` of the shape of ``t_cur``.

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)          # exact score of N(0, 1) data
    >>> x0 = np.random.default_rng(1).standard_normal((4000, 1))
    >>> L = corrector_cost(gauss, ve(), 0.6, 0.5, x0, rng=0)
    >>> a, a2 = 1 + ve().sigma(0.6) ** 2, 1 + ve().sigma(0.5) ** 2     # the closed form for Gaussian data
    >>> exact = ve().sigma(0.5) ** 2 * a * (1 / a - 1 / a2) ** 2
    >>> bool(abs(L.value - exact) < 3 * L.stderr)
    True
    """
    return _per_interval(_corrector_cost, score, process, t_cur, t_next, x0, rng, velocity)


def _corrector_cost(score, process, t, t2, x0, rng, v):
    x = noised(process, x0, t, rng)
    return mean_stderr(v(t2) ** 2 * np.sum((score(x, t2) - score(x, t)) ** 2, axis=1))


def _per_interval(cost, score, process, t_cur, t_next, x0, rng, velocity):
    """A cost's arguments checked, then its one-interval ``cost`` on scalar times or on each pair of times, in order."""
    process = check_process(process)
    t, t2 = check_step_times(t_cur, t_next, process)
    score, x0, rng, v = (checked_score(score, process=process), check_data(x0, min_rows=2), as_rng(rng),
                         check_velocity(velocity, process))
    if t.ndim == 0:
        return cost(score, process, float(t), float(t2), x0, rng, v)
    out = [cost(score, process, float(a), float(b), x0, rng, v) for a, b in zip(t.ravel(), t2.ravel())]
    return Estimate(*(np.array(c).reshape(t.shape) for c in zip(*out)))


def ddim_coefficients(process, t_cur, t_next):
    """``(a, b)`` of the Euler (DDIM) predictor ``F(x) = a x + b S(x, t_cur)``.

    Euler's method for the probability-flow ODE ``d(x/s)/d nu = -nu s S(x, t)``: DDIM for VP processes (Song et
    al. 2021) and EDM's Euler stage, ``a = s(t')/s(t)``, ``b = s(t') s(t) nu(t) (nu(t) - nu(t'))``.

    >>> a, b = ddim_coefficients(ve(), 1.0, 0.0)
    >>> float(a), round(float(b), 3)
    (1.0, 6399.84)
    """
    s, s_next = process.s(t_cur), process.s(t_next)
    nu, nu_next = process.nsr(t_cur), process.nsr(t_next)
    return s_next / s, s_next * s * nu * (nu - nu_next)


def predictor_cost(score, process, t_cur, t_next, x0, rng, *, velocity=None):
    """Predictor-optimised cost ``L_p(t, t')`` of the Euler (DDIM) predictor (paper, Sec. 3).

    The paper's ``v(t')^2 D(p_t' || F#p_t)`` for ``F(x) = a x + b S(x, t)`` (:func:`ddim_coefficients`), in an
    explicit form derived here (docs/derivations.md, 2): with ``J = dF/dx = a I + b dS/dx``, the change of
    variables gives ``grad log(F#p_t)(F(x)) = J^{-T} [S(x, t) - grad_x log|det J|]`` and

        L_p = v(t')^2 E_{x ~ p_t} || S(F(x), t') - J^{-T}[S(x, t) - grad log|det J|] ||^2,

    ``L_p`` is ``O(h^4)`` with exact scores. The Jacobians take ``O(d)`` autograd passes: the score must be
    written with ``autograd.numpy`` (a plain-NumPy score gives a wrong cost, with autograd's warning that the
    output seems independent of the input) and act on rows independently; meant for small ``d``. Arguments as
    :func:`corrector_cost`.

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)
    >>> x0 = np.random.default_rng(1).standard_normal((2000, 1))
    >>> bool(predictor_cost(gauss, ve(), 0.6, 0.5, x0, 0).value < corrector_cost(gauss, ve(), 0.6, 0.5, x0, 0).value)
    True
    """
    return _per_interval(_predictor_cost, score, process, t_cur, t_next, x0, rng, velocity)


def _predictor_cost(score, process, t, t2, x0, rng, v):
    x = noised(process, x0, t, rng)
    a, b = (float(c) for c in ddim_coefficients(process, t, t2))
    raw, d = score.score, x.shape[1]             # autograd traces the unchecked score

    def jacobian_F(x):  # (n, d, d), J[i, k, j] = dF_k / dx_j at row i
        H = anp.stack([elementwise_grad(lambda y, k=k: raw(y, t)[:, k])(x) for k in range(d)], axis=1)
        return a * anp.eye(d) + b * H

    S, J = score(x, t), jacobian_F(x)
    with warnings.catch_warnings():           # a linear score (Gaussian data) has a constant log-determinant
        warnings.filterwarnings("ignore", "Output seems independent of input")
        grad_log_det = elementwise_grad(lambda y: anp.sum(anp.linalg.slogdet(jacobian_F(y))[1]))(x)
    pushed = np.linalg.solve(np.swapaxes(J, 1, 2), (S - grad_log_det)[:, :, None])[:, :, 0]
    return mean_stderr(v(t2) ** 2 * np.sum((score(a * x + b * S, t2) - pushed) ** 2, axis=1))


def interval_costs(score, process, ts, x0, rng, *, cost=corrector_cost, **cost_options):
    """The costs ``L_i = L(t_{i+1}, t_i)`` of every step of a schedule: Algorithm 1's input.

    ``cost``: :func:`corrector_cost` (alias ``"corrector"``), :func:`predictor_cost` (``"predictor"``) or a function
    with their signature, called once with the arrays of the steps' noisier and cleaner ends and ``cost_options``.
    Monte-Carlo values below zero are clipped at zero. Returns an :class:`Estimate` of arrays ``(T,)``.

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)
    >>> x0 = np.random.default_rng(1).standard_normal((500, 1))
    >>> interval_costs(gauss, ve(), uniform_schedule(ve(), 4), x0, 0).value.shape
    (4,)
    """
    process = check_process(process)
    ts = check_schedule(ts, process, endpoints=False)
    cost = resolve(cost, COSTS, "cost")
    value, stderr = cost(score, process, ts[1:], ts[:-1], x0, rng, **cost_options)
    return Estimate(np.maximum(np.asarray(value, dtype=float), 0.0), np.asarray(stderr, dtype=float))


COSTS = {"corrector": corrector_cost, "predictor": predictor_cost}


# -- The local cost delta_c ------------------------------------------------------

def local_cost(score, process, ts, x0, rng, *, velocity=None, derivative=None):
    """Local corrector cost ``delta_c(t) = v(t)^2 E_{x ~ p_t} ||d/dt S(x, t)||^2`` at each time of ``ts``.

    ``L_c(t, t + h) = delta_c(t) h^2 + O(h^3)`` (paper, Sec. 3). At each time a fresh ``x = s(t) x0 + sigma(t) eps``
    is drawn and ``dS/dt`` taken at fixed ``x`` by ``derivative``: :func:`central_difference` (the default, alias
    ``"central"``), :func:`forward_mode` (``"autograd"``) or a function with their signature. Returns an
    :class:`Estimate` of arrays of the shape of ``ts``.

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)          # N(0, 1) data under ve()
    >>> x0 = np.random.default_rng(1).standard_normal((20000, 1))
    >>> delta = local_cost(gauss, ve(), [0.5], x0, rng=0).value
    >>> exact = 4 * 0.4 ** 6 / (1 + 0.4 ** 2) ** 3 * np.log(40000) ** 2   # 4 sigma^4 sigma'^2 / (1 + sigma^2)^3
    >>> bool(abs(delta[0] / exact - 1) < 0.05)
    True
    """
    process = check_process(process)
    score = checked_score(score, process=process)
    ts = check_schedule(ts, process, endpoints=False, min_len=1)
    x0, rng, v = check_data(x0, min_rows=2), as_rng(rng), check_velocity(velocity, process)
    derivative = resolve(central_difference if derivative is None else derivative, DERIVATIVES, "derivative")
    levels = [mean_stderr(local_cost_samples(score, process, noised(process, x0, t, rng), t, derivative, v(t) ** 2))
              for t in ts]
    return Estimate(*(np.array(a) for a in zip(*levels)))


def local_cost_samples(score, process, x, t, derivative, v2):
    """The integrand of ``delta_c`` per sample, ``v2 ||dS/dt (x_j, t)||^2`` with ``v2 = v(t)^2`` (every
    estimator of ``delta_c`` calls this one)."""
    return v2 * np.sum(derivative(score, process, x, t) ** 2, axis=1)


def central_difference(score, process, x, t, rel_step=1e-3):
    """``dS/dt`` at fixed ``x``: a central difference whose step is ``rel_step`` in ``log nu``.

    ``h = rel_step / |d log nu / dt|``, at most a quarter of the range; where ``t +- h`` would leave it the one-sided
    second-order stencil is used. A row whose evaluations differ by less than 1e-12 of the score's size (float64
    rounding: the score does not depend on ``t``) gets a derivative of 0. 2 score calls (3 at the ends).

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)
    >>> dS = central_difference(gauss, ve(), np.ones((1, 1)), 0.5)
    >>> bool(np.isclose(dS[0, 0], 2 * 0.4 ** 2 * np.log(40000) / (1 + 0.4 ** 2) ** 2, rtol=1e-5))
    True
    """
    h = float(_fd_steps(process, np.array([t]), rel_step)[0])
    if t - h < process.t_min:      # one-sided at the clean end
        ends = score(x, t), score(x, t + h), score(x, t + 2 * h)
        diff = (-3 * ends[0] + 4 * ends[1] - ends[2]) / (2 * h)
    elif t + h > process.t_max:    # one-sided at the noisy end
        ends = score(x, t), score(x, t - h), score(x, t - 2 * h)
        diff = (3 * ends[0] - 4 * ends[1] + ends[2]) / (2 * h)
    else:
        ends = score(x, t + h), score(x, t - h)
        diff = (ends[0] - ends[1]) / (2 * h)
    size = np.max([np.linalg.norm(e, axis=1) for e in ends], axis=0)
    flat = np.linalg.norm(ends[0] - ends[1], axis=1) <= 1e-12 * size
    return np.where(flat[:, None], 0.0, diff)


def forward_mode(score, process, x, t):
    """``dS/dt`` at fixed ``x`` by forward-mode autograd through ``t`` (1 score call).

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)
    >>> bool(np.allclose(forward_mode(gauss, ve(), np.ones((1, 1)), 0.5),
    ...                  central_difference(gauss, ve(), np.ones((1, 1)), 0.5), rtol=1e-5))
    True
    """
    raw = getattr(score, "score", score)
    value = make_jvp(lambda tt: raw(x, tt))(float(t))(1.0)[1]
    return checked_output(value, x.shape, t, score.name) if isinstance(score, _CheckedScore) else value


def _fd_steps(process, ts, rel_step):
    """Steps ``h = rel_step / |d log nu / dt|``, at most a quarter of the range (a stencil always fits)."""
    return np.minimum(rel_step / _log_nsr_rate(process, ts), 0.25 * (process.t_max - process.t_min))


def _log_nsr_rate(process, ts):
    """``|d log nu / dt|`` at the times ``ts``."""
    return np.abs(elementwise_grad(lambda t: anp.log(process.nsr(t)))(ts))


DERIVATIVES = {"central": central_difference, "fd": central_difference, "autograd": forward_mode,
               "forward": forward_mode}


# -- The exact local cost for Gaussian data (derived: docs/derivations.md, 1) ----

def gaussian_local_cost(process, ts, variances, mean=None):
    """Exact ``delta_c(t)`` for data ``N(mean, diag(variances))`` with ``v = sigma`` (derived).

    ``p_t = N(s mean, diag(a))``, ``a_k = s^2 lambda_k + sigma^2``, ``delta_c = sigma^2 [sum_k a_k'^2 / a_k^3 +
    sum_k s'^2 mean_k^2 / a_k^2]``, ``a_k' = 2 s s' lambda_k + 2 sigma sigma'``; ``ts`` of any shape, a variance
    may be 0. Use it to check a vendored copy of this part: for ``ve()`` and ``N(0, c^2 I_d)`` it integrates to
    ``Lambda(sigma) = 2 sqrt(d) [asinh(sigma/c) - sigma / sqrt(c^2 + sigma^2)]`` (docs/derivations.md, 1).

    >>> ts = time_from_nsr(ve(), np.geomspace(0.002, 80.0, 2001))
    >>> delta = gaussian_local_cost(ve(), ts, [0.25])                       # N(0, 0.5^2) data
    >>> L = lambda s: 2 * (np.arcsinh(s / 0.5) - s / np.sqrt(0.25 + s ** 2))
    >>> round(float(cumulative_cost(ts, delta)[-1]), 3), round(float(L(80.0) - L(0.002)), 3)
    (9.537, 9.537)
    """
    process = check_process(process)
    ts = check_times(ts, process, "ts")
    lam = as_real_array(variances, "variances").reshape(-1)
    mu = np.zeros_like(lam) if mean is None else as_real_array(mean, "mean").reshape(-1)
    if np.any(lam < 0) or not np.all(np.isfinite(lam)) or mu.shape != lam.shape or not np.all(np.isfinite(mu)):
        raise ValueError("`variances` must be finite and non-negative, and `mean` finite of the same length")
    s, sigma, ds, dsigma = (np.asarray(f(ts), dtype=float)[..., None] for f in
                            (process.s, process.sigma, elementwise_grad(process.s), elementwise_grad(process.sigma)))
    a, da = s ** 2 * lam + sigma ** 2, 2 * s * ds * lam + 2 * sigma * dsigma
    return sigma[..., 0] ** 2 * (np.sum(da ** 2 / a ** 3, axis=-1) + np.sum(ds ** 2 * mu ** 2 / a ** 2, axis=-1))


# -- The path length Lambda, its inverse, the optimal schedule and Algorithm 1 --

def cumulative_cost(ts, delta, *, order=2):
    """Cumulative length ``Lambda(t) = int_{t_0}^t delta(r)^(1/order) dr`` on the grid ``ts`` (paper, Sec. 3).

    Every ``Lambda`` here comes from it: the trapezoid rule in the grid's own coordinate, valid in any, since a
    local cost transforms as a metric (``delta_u = delta_t (dt/du)^2``; docs/derivations.md, 5). ``Lambda[0] = 0``;
    ``Lambda[-1]`` is the path length. ``order = n`` is for a cost ``L = delta h^n`` (derived:
    docs/derivations.md, 3).

    >>> cumulative_cost([0.0, 1.0, 2.0], [1.0, 4.0, 9.0]).tolist()
    [0.0, 1.5, 4.0]
    """
    ts = check_schedule(ts, endpoints=False)
    delta, order = check_costs(delta, len(ts), name="delta"), check_positive(order, "order")
    return np.concatenate([[0.0], np.cumsum(_trapezoid_increments(ts, delta, order))])


def _trapezoid_increments(ts, delta, order):
    root = delta ** (1.0 / order)
    return 0.5 * (root[1:] + root[:-1]) * np.diff(ts)


# A zero-cost interval would make Lambda flat and its inverse undefined: each length increment is raised to at
# least this fraction of the largest.
INCREMENT_FLOOR = 1e-8


def _invert_cumulative(ts, increments, T):
    """``Lambda^{-1}(i Lambda / T)``, i = 0..T, ``Lambda`` the cumulative ``increments`` over ``ts``: PCHIP."""
    top = np.max(increments)
    if top == 0.0:
        warnings.warn("the cost is zero on the whole range: every schedule is free; returning the uniform "
                      "schedule", RuntimeWarning, stacklevel=3)
        return _pin(np.linspace(ts[0], ts[-1], T + 1), ts[0], ts[-1])
    Lambda = np.concatenate([[0.0], np.cumsum(np.maximum(increments, INCREMENT_FLOOR * top))])
    out = _pin(PchipInterpolator(Lambda, ts)(Lambda[-1] * np.arange(T + 1) / T), ts[0], ts[-1])
    if not np.all(np.diff(out) > 0):
        raise ValueError(f"`T` = {T} is too large for the resolution of the grid: two times coincide in float64")
    return out


def optimal_schedule(ts, delta, T, *, order=2):
    """The optimal ``T``-step schedule ``t*_i = Lambda^{-1}(i Lambda / T)`` from a local cost on a dense grid
    (the paper's Theorem 3.1).

    Constant speed in the metric ``delta``: every step costs ``(Lambda / T)^2`` to leading order, the least total
    (Cauchy-Schwarz). ``ts``: the dense grid (hundreds of times, e.g. uniform in ``log nu``) on which ``delta``
    was estimated (:func:`local_cost`); it gives the output's endpoints. Zero cost everywhere: a warning and the
    uniform schedule. It is the schedule for a predictor followed by Langevin corrector steps (the paper's
    Figure 1). Annealed Langevin alone cannot take its long last step, and with ODE samplers alone (Euler, Heun,
    DPM-Solver++) it was measured to lose to simple baselines (docs/guide/schedules.md).

    >>> ts = np.linspace(0.0, 1.0, 101)
    >>> optimal_schedule(ts, np.ones(101), 4).round(6).tolist()          # constant cost: uniform
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> optimal_schedule(ts, 4 * ts ** 2, 2).round(4).tolist()           # Lambda = t^2: half of it at sqrt(1/2)
    [0.0, 0.7071, 1.0]
    """
    ts = check_schedule(ts, endpoints=False)
    delta, order = check_costs(delta, len(ts), name="delta"), check_positive(order, "order")
    return _invert_cumulative(ts, _trapezoid_increments(ts, delta, order), check_int(T, "T", 1))


def update_schedule(ts, costs, *, order=2):
    """Algorithm 1 (UpdateSchedule) of the paper: the schedule that equalises the cost of every step.

    ``Lambda_0 = 0``, ``Lambda_{i+1} = Lambda_i + L_i^(1/order)`` with ``L_i = L(t_{i+1}, t_i)``; then ``t*_i =
    Lambda^{-1}(i Lambda_T / T)`` through a monotone cubic (PCHIP). ``order = n`` is for a cost of order ``h^n``
    (derived: docs/derivations.md, 3). Increments below ``INCREMENT_FLOOR`` times the largest are raised to it.
    The same endpoints (exactly) and number of steps as ``ts``; equal costs are a fixed point; scaling the
    costs changes nothing.

    >>> update_schedule([0.0, 0.5, 1.0], [1.0, 1.0]).tolist()
    [0.0, 0.5, 1.0]
    >>> update_schedule([0.0, 0.5, 1.0], [9.0, 1.0]).round(4).tolist()   # the costly first step shrinks
    [0.0, 0.2492, 1.0]
    """
    ts = check_schedule(ts, endpoints=False)
    costs, order = check_costs(costs, len(ts) - 1), check_positive(order, "order")
    return _invert_cumulative(ts, costs ** (1.0 / order), len(ts) - 1)


def path_length(costs, *, order=2):
    """Discrete path length ``sum_i L_i^(1/order)`` of a schedule's step costs (paper, Sec. 3).

    For a fine schedule it approximates ``Lambda``: ``(path_length / T)^2`` is an optimal schedule's step cost.

    >>> path_length([1.0, 4.0])
    3.0
    """
    costs, order = check_costs(costs, nonempty=True), check_positive(order, "order")
    return float(np.sum(costs ** (1.0 / order)))


def path_energy(costs):
    """Discrete path energy ``T sum_i L_i`` of a schedule (paper, Sec. 3).

    It approximates ``E(phi)``; ``path_length^2 <= path_energy``, with equality iff all costs are equal
    (Cauchy-Schwarz).

    >>> path_energy([1.0, 4.0]), path_length([1.0, 4.0]) ** 2
    (10.0, 9.0)
    """
    costs = check_costs(costs, nonempty=True)
    return float(len(costs) * np.sum(costs))


# -- The blend and Algorithm 2 ---------------------------------------------------

def blend(ts, ts_star, gamma):
    """Algorithm 2's blend ``gamma ts_star + (1 - gamma) ts``, ``gamma`` in ``(0, 1]``: a schedule again.

    >>> blend([0.0, 0.5, 1.0], [0.0, 0.3, 1.0], 0.5).tolist()
    [0.0, 0.4, 1.0]
    """
    ts, ts_star = check_schedule(ts, endpoints=False), check_schedule(ts_star, endpoints=False, name="ts_star")
    if ts.shape != ts_star.shape or ts[0] != ts_star[0] or ts[-1] != ts_star[-1]:
        raise ValueError("`ts` and `ts_star` must have the same length and endpoints")
    return _blend(ts, ts_star, check_gamma(gamma))


def _blend(ts, ts_star, gamma):
    return _pin(gamma * ts_star + (1.0 - gamma) * ts, ts[0], ts[-1])


class OnlineUpdate(NamedTuple):
    """One schedule update of Algorithm 2 (:func:`online_update`)."""
    ts: np.ndarray          # the next schedule, blend(ts, ts_star, gamma)
    ts_star: np.ndarray     # the target schedule of this update
    costs: np.ndarray       # interval costs of the current schedule, (T,)
    length: float           # the path length this update measured


def grid_route(score, process, ts, x0, rng, *, n_grid=200, velocity=None):
    """Algorithm 2's steps 2-3 on a dense grid, the default route: ``delta_c`` at ``n_grid`` times uniform in
    ``u = log nu`` (:func:`local_cost`), then ``ts* = Lambda^{-1}(i Lambda / T)`` (Theorem 3.1), both in ``u``,
    where ``sqrt(delta)`` is smooth (``delta_u = delta_t (dt/du)^2``). ``costs[i] = (Lambda(t_{i+1}) -
    Lambda(t_i))^2`` over the steps of ``ts``. Returns ``(ts_star, costs, length)``.

    >>> gauss = lambda x, t: -x / (0.25 + ve().sigma(t) ** 2)        # exact score of N(0, 0.5^2) under ve()
    >>> x0 = 0.5 * np.random.default_rng(1).standard_normal((1000, 1))
    >>> ts_star, costs, length = grid_route(gauss, ve(), uniform_schedule(ve(), 10), x0, 0)
    >>> round(float(ve().sigma(ts_star[1])), 2), round(length, 2)      # closed form: 0.90 and 9.54
    (0.9, 9.54)
    """
    process = check_process(process)
    ts = check_schedule(ts, process)
    grid = _schedule_from_nsr(process, np.geomspace(*nsr_range(process), check_int(n_grid, "n_grid", 2)))
    u = np.log(process.nsr(grid))
    dt_du = 1.0 / _log_nsr_rate(process, grid)
    delta = local_cost(score, process, grid, x0, rng, velocity=velocity).value * dt_du ** 2
    Lambda = cumulative_cost(u, delta)
    ts_star = _pin(PchipInterpolator(u, grid)(optimal_schedule(u, delta, len(ts) - 1)), grid[0], grid[-1])
    return ts_star, np.diff(np.interp(ts, grid, Lambda)) ** 2, float(Lambda[-1])


def interval_route(score, process, ts, x0, rng, *, cost=corrector_cost, order=2):
    """Algorithm 2's steps 2-3 as the paper writes them: the interval costs of ``ts`` (:func:`interval_costs`,
    the corrector cost by default), then ``ts* = UpdateSchedule(ts, L)`` (Algorithm 1). Returns
    ``(ts_star, costs, length)``, ``length`` the :func:`path_length` of the costs.

    It degenerates on smooth data with few steps (docs/derivations.md, 4): the cleanest step's corrector cost,
    with ``v(t_0) = sigma_min``, stays small however wide the step, so the first step grows. For the exact score
    of N(0, 0.5^2) under ``ve()``, 30 updates (``gamma = 0.5``) give ``sigma_1`` = 41.1, 21.0, 6.58 at T = 5, 10,
    20, against the optimal 1.65, 0.90, 0.59. Use it with many steps, or a velocity that stays away from 0.

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)
    >>> x0 = np.random.default_rng(1).standard_normal((500, 1))
    >>> ts_star, costs, length = interval_route(gauss, ve(), uniform_schedule(ve(), 4), x0, 0)
    >>> float(ts_star[0]), float(ts_star[-1]), costs.shape
    (0.0, 1.0, (4,))
    """
    costs = interval_costs(score, process, ts, x0, rng, cost=cost).value
    return update_schedule(ts, costs, order=order), costs, path_length(costs, order=order)


ROUTES = {"grid": grid_route, "intervals": interval_route}


def online_update(score, process, ts, x0, rng, *, gamma, route=grid_route, **route_options):
    """Algorithm 2 of the paper, steps 2-4: one schedule update with the score model fixed.

    2-3. ``route(score, process, ts, x0, rng, **route_options) -> (ts_star, costs, length)`` finds the target:
    :func:`grid_route` (the default, alias ``"grid"``: Theorem 3.1), :func:`interval_route` (``"intervals"``:
    Algorithm 1, as the paper writes it; it degenerates on smooth data with few steps) or a function with their
    signature; its output is checked. 4. ``ts <- gamma ts_star + (1 - gamma) ts`` (:func:`blend`). Step 1,
    optimiser steps on the model with ``ts`` fixed, is the caller's (``models.train``). Returns an
    :class:`OnlineUpdate`.

    >>> gauss = lambda x, t: -x / (1.0 + ve().sigma(t) ** 2)
    >>> x0 = np.random.default_rng(1).standard_normal((500, 1))
    >>> update = online_update(gauss, ve(), uniform_schedule(ve(), 4), x0, 0, gamma=0.5)
    >>> bool(np.all(np.diff(update.ts) > 0)), float(update.ts[0]), float(update.ts[-1])
    (True, 0.0, 1.0)
    """
    process = check_process(process)
    ts, gamma = check_schedule(ts, process), check_gamma(gamma)
    route = resolve(route, ROUTES, "route")
    out = route(score, process, ts, x0, rng, **route_options)
    name = f"`route` {getattr(route, '__name__', type(route).__name__)}"
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(f"{name} returned {type(out).__name__}; expected (ts_star, costs, length)")
    ts_star = check_schedule(out[0], process, name=f"ts_star returned by {name}")
    if ts_star.shape != ts.shape:
        raise ValueError(f"{name} returned {len(ts_star)} times in `ts_star`; expected {len(ts)}")
    costs = check_costs(out[1], len(ts) - 1, name=f"costs returned by {name}")
    return OnlineUpdate(_blend(ts, ts_star, gamma), ts_star, costs, check_real(out[2], f"length returned by {name}"))


# -- Checks, at each public boundary (shared with sampler.py and models.py) ------

class ScoreEvaluationError(RuntimeError):
    """A score (or another callable of the user's) raised; the original error is its ``__cause__``."""


class _CheckedScore:
    """A user's score, called as :func:`checked_score` describes; ``.score`` is the raw callable."""

    def __init__(self, score, name, batch_size):
        self.score, self.name, self.batch_size, self.calls, self.evaluations = score, name, batch_size, 0, 0

    def __call__(self, x, t):
        size = len(x) if self.batch_size is None else self.batch_size
        parts = [self._call(x[i:i + size], t if np.ndim(t) == 0 else t[i:i + size]) for i in range(0, len(x), size)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _call(self, x, t):
        self.calls, self.evaluations = self.calls + 1, self.evaluations + len(x)
        try:
            value = self.score(x, t)
        except Exception as err:
            if isinstance(err, ScoreEvaluationError) or getattr(err, "checked_output", False):   # a wrapper's: as it is
                raise
            raise ScoreEvaluationError(f"`{self.name}` raised {type(err).__name__} at {_when(t)}: {err}") from err
        return checked_output(value, x.shape, t, self.name)


def checked_score(score, name="score", *, batch_size=None, process=None):
    """``score`` wrapped so that every call is checked (:func:`checked_output`) and counted (``calls``,
    ``evaluations`` in rows); a raise becomes a :class:`ScoreEvaluationError` naming the time; ``batch_size``
    splits calls into chunks (same results). A score that records the ``process`` it was built for is refused
    for another ``process``."""
    if isinstance(score, _CheckedScore) and batch_size is None:
        return score
    raw = score.score if isinstance(score, _CheckedScore) else check_callable(score, name, f"{name}(x, t)")
    own = getattr(raw, "process", None)
    if process is not None and isinstance(own, Process) and not same_process(own, process):
        other = (f"another process named {process.name!r} (s or sigma differ)" if own.name == process.name else
                 repr(process.name))
        raise ValueError(f"`{name}` was built for the process {own.name!r} and is used with {other}: its "
                         "outputs mean other noise levels there; build it with the process you pass")
    return _CheckedScore(raw, name, None if batch_size is None else check_int(batch_size, "batch_size", 1))


def checked_output(value, shape, t, name):
    """A score's output as a new float64 array: floating point, of ``shape``, finite; else an error naming
    ``name`` and the time, marked so that an outer wrapper passes it on unchanged."""
    array = np.asarray(value)
    if array.dtype.kind != "f":
        err = TypeError(f"`{name}` returned {array.dtype} values at {_when(t)}; it must be float")
    elif array.shape != tuple(shape):
        err = ValueError(f"`{name}` returned shape {array.shape} at {_when(t)}; expected {tuple(shape)}")
    elif not np.all(np.isfinite(array)):
        err = ValueError(f"`{name}` returned non-finite values at {_when(t)}")
    else:
        return np.array(array, dtype=float)
    err.checked_output = True
    raise err


def _when(t):
    if np.ndim(t) == 0:
        return f"t = {float(getval(t)):.6g}"
    t = np.asarray(getval(t), dtype=float)
    return f"t in [{t.min():.6g}, {t.max():.6g}] (one time per row)"


def check_velocity(velocity, process):
    """``process.sigma`` for None; else ``velocity`` with every value checked (finite, >= 0)."""
    if velocity is None:
        return process.sigma
    return partial(_checked_velocity, check_callable(velocity, "velocity", "v(t)"))


def _checked_velocity(velocity, t):
    value = velocity(t)
    if np.iscomplexobj(value) or not np.all(np.isfinite(value)) or np.any(np.asarray(value) < 0):
        raise ValueError(f"`velocity` returned {value} at t = {float(t):.6g}; it must be finite and >= 0")
    return value


def check_process(process):
    """``process`` if it is a :class:`Process` on finite ``t_min < t_max`` whose ``nu`` is finite, positive and
    increasing (``t = 0`` is the data end)."""
    if not isinstance(process, Process):
        raise TypeError(f"`process` must be a scoreopt.Process, got {type(process).__name__}")
    if not (np.isfinite(process.t_min) and np.isfinite(process.t_max) and process.t_min < process.t_max):
        raise ValueError(f"`process` must have finite t_min < t_max, got [{process.t_min}, {process.t_max}]")
    nu = np.asarray(process.nsr(np.linspace(process.t_min, process.t_max, 9)), dtype=float)
    if not (np.all(np.isfinite(nu)) and np.all(nu > 0) and np.all(np.diff(nu) > 0)):
        raise ValueError(f"`process` {process.name!r}: nu = sigma/s must be finite, positive and increasing from "
                         f"t_min to t_max (t = 0 is the data end, noise grows with t); it goes from {nu[0]:.4g} to "
                         f"{nu[-1]:.4g}")
    return process


def same_process(a, b):
    """Whether processes ``a`` and ``b`` have one name and compute the same (:func:`process_digest`): two custom
    processes keep the default name "process"."""
    return a is b or (a.name == b.name and process_digest(a) == process_digest(b))


def process_digest(process):
    """What a process computes, as a hash: ``sha256`` of its range and of ``s`` and ``sigma`` at 17 times across
    it (10 significant digits), the first 12 hex digits."""
    t = np.linspace(process.t_min, process.t_max, 17)
    values = [process.t_min, process.t_max] + [float(v) for f in (process.s, process.sigma)
                                               for v in np.broadcast_to(np.asarray(f(t), dtype=float), t.shape)]
    return hashlib.sha256(" ".join(f"{v:.10g}" for v in values).encode()).hexdigest()[:12]


def nsr_range(process):
    """``(nu(t_min), nu(t_max))`` as floats."""
    nu_min, nu_max = process.nsr(np.array([process.t_min, process.t_max]))
    return float(nu_min), float(nu_max)


def check_schedule(ts, process=None, endpoints=True, name="ts", min_len=2):
    """A schedule as a float64 array: 1-D, at least ``min_len`` finite, strictly increasing times; with a
    ``process``, inside ``[t_min, t_max]`` and (``endpoints``) starting and ending there exactly."""
    ts = as_real_array(ts, name)
    if ts.ndim != 1 or len(ts) < min_len:
        raise ValueError(f"`{name}` must be a 1-D array of at least {min_len} times")
    bad = np.flatnonzero(np.diff(check_times(ts, None, name)) <= 0)
    if len(bad):
        raise ValueError(f"`{name}` must be strictly increasing (index {bad[0]} to {bad[0] + 1})")
    if process is not None and endpoints and (ts[0] != process.t_min or ts[-1] != process.t_max):
        raise ValueError(f"`{name}` must start at t_min = {process.t_min} and end at t_max = {process.t_max} exactly")
    return ts if process is None else check_times(ts, process, name)


def check_times(ts, process, name):
    """Finite real times (any shape), inside ``[t_min, t_max]`` with a ``process``, as a float array."""
    ts = as_real_array(ts, name)
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"`{name}` must be finite")
    if process is not None and (np.any(ts < process.t_min) or np.any(ts > process.t_max)):
        raise ValueError(f"`{name}` must lie in [{process.t_min}, {process.t_max}], the process's range")
    return ts


def check_step_times(t_cur, t_next, process):
    """The two ends of steps (either order), of one shape, inside the process's range."""
    t_cur, t_next = check_times(t_cur, process, "t_cur"), check_times(t_next, process, "t_next")
    if t_cur.shape != t_next.shape:
        raise ValueError(f"`t_cur` and `t_next` must have the same shape, got {t_cur.shape} and {t_next.shape}")
    return t_cur, t_next


def check_data(x, name="x0", min_rows=1):
    """A finite float array of shape ``(n, d)``, ``n >= min_rows``."""
    x = as_real_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape (n, d), got {x.shape} (1-D data: pass x[:, None])")
    if len(x) < min_rows or x.shape[1] < 1:
        raise ValueError(f"`{name}` needs at least {min_rows} row{'s' if min_rows > 1 else ''} and one column, "
                         f"got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` must be finite")
    return x


def check_costs(costs, length=None, name="costs", nonempty=False):
    """Finite, non-negative costs, 1-D (of ``length``); a bad entry is named with its interval."""
    costs = as_real_array(costs, name)
    if costs.ndim != 1 or (length is not None and len(costs) != length):
        raise ValueError(f"`{name}` must be a 1-D array{'' if length is None else f' of length {length}'}, got "
                         f"shape {costs.shape}")
    if nonempty and len(costs) == 0:
        raise ValueError(f"`{name}` must not be empty: a schedule has at least one step")
    bad = np.flatnonzero(~np.isfinite(costs) | (costs < 0))
    if len(bad):
        raise ValueError(f"`{name}` must be finite and non-negative; entry {bad[0]} (interval {bad[0]}) is "
                         f"{costs[bad[0]]}")
    return costs


def check_int(value, name, minimum):
    """An integer (not a bool) at least ``minimum``, as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_real(value, name, positive=False, at_most=np.inf):
    """A finite real number (not a bool, not complex), above 0 if ``positive``, at most ``at_most``: a ``float``."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) or (isinstance(value, np.ndarray) and value.ndim == 0)
    if isinstance(value, bool) or np.iscomplexobj(value) or not ok:
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    if not np.isfinite(value) or (positive and value <= 0) or value > at_most:
        rule = f"lie in (0, {at_most:g}]" if at_most < np.inf else "be positive" if positive else "be finite"
        raise ValueError(f"`{name}` must {rule}, got {value}")
    return float(value)


check_positive = partial(check_real, positive=True)       # a finite positive real number, as float
check_gamma = partial(check_real, name="gamma", positive=True, at_most=1.0)      # a blend rate in (0, 1]


def check_callable(f, name, signature):
    """``f`` if it is callable, else a TypeError naming ``name`` and the ``signature`` expected."""
    if not callable(f):
        raise TypeError(f"`{name}` must be callable as {signature}, got {type(f).__name__}")
    return f


def resolve(choice, aliases, name):
    """A function given as itself or by one of its alias names: names are resolved once, at the boundary."""
    if callable(choice):
        return choice
    if isinstance(choice, str) and choice in aliases:
        return aliases[choice]
    raise ValueError(f"`{name}` must be a function or one of {sorted(aliases)}, got {choice!r}")


def as_real_array(x, name):
    """``x`` as a float64 array; complex or non-numeric input is a TypeError naming ``name``."""
    if np.iscomplexobj(x):
        raise TypeError(f"`{name}` must be real, got complex values")
    try:
        return np.array(x, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be an array of real numbers") from None


def as_rng(rng):
    """``rng`` if it is a ``numpy.random.Generator``, else a Generator seeded with ``rng``, an int >= 0."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise TypeError(f"`rng` must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")
    return np.random.default_rng(check_int(rng, "rng", 0))


def as_column(a):
    """A per-row coefficient (shape (n,)) as a column (n, 1), to scale rows of ``x``; scalars as they are."""
    return anp.reshape(a, (-1, 1)) if anp.ndim(a) else a


# ================================================================================
# PART II. DERIVED OR ADDED HERE (docs/derivations.md)
# ================================================================================

# Part II needs more of the standard library than the paper does; it is imported here, so that a
# copy of Part I alone imports only numpy, scipy and autograd.
import argparse, errno, json, multiprocessing, os, pickle, re, stat, sys, threading, time  # noqa: E401, E402
from concurrent.futures import ProcessPoolExecutor, wait                              # noqa: E402
from concurrent.futures.process import BrokenProcessPool                              # noqa: E402
from contextlib import contextmanager                                                 # noqa: E402
from datetime import datetime, timezone                                               # noqa: E402
from importlib.metadata import version as package_version                             # noqa: E402
from autograd.tracer import Box                                                        # noqa: E402
from scipy.special import stdtrit                                                      # noqa: E402

__all__ += [
    "loglinear_schedule", "arctan_schedule", "baseline_schedules",
    "EqualCostResult", "equal_cost_schedule", "iterate_schedule", "stop_at_budget",
    "ScheduleMap", "estimate_schedule_map", "load_schedule_map",
    "flow_matching", "process_from_alphas_cumprod", "to_timesteps", "to_sigmas", "snap_to_table",
    "consumer_schedules", "to_diffusers", "to_comfyui",
    "score_from_denoiser", "score_from_eps", "score_from_v", "score_from_flow", "rowwise_score", "guest_score",
    "write_atomically", "progress_printer", "main",
]


# -- Checks that only this part needs --------------------------------------------

def check_data_scale(second_moment, process):
    """Warn when the data's scale (the root of the largest per-coordinate ``E[x^2]``) lies outside the noise
    levels the process reaches: its noise never covers the data, or its cleanest level already hides it."""
    scale = float(np.sqrt(np.max(second_moment)))
    nu_min, nu_max = nsr_range(process)
    if scale > nu_max or 0 < scale < nu_min:
        warnings.warn(f"the data's scale ({scale:.3g}, root mean square of its largest coordinate) is "
                      + (f"above the largest noise-to-signal ratio of the process {process.name} ({nu_max:.3g}): its "
                         "noise never covers the data" if scale > nu_max else
                         f"below the smallest noise-to-signal ratio of the process {process.name} ({nu_min:.3g}): "
                         "its cleanest level already hides the data")
                      + "; rescale the data (to about unit scale) or use a process whose range covers it",
                      RuntimeWarning, stacklevel=3)


def check_bool(value, name):
    """``True`` or ``False`` (or a NumPy bool); a string such as ``'no'`` is refused, not read as truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"`{name}` must be True or False, got {value!r}")


# -- More baselines --------------------------------------------------------------

def loglinear_schedule(process, T):
    """Uniform in ``log nu`` ("LogLinear", Lu et al. 2022; k-diffusion's ``get_sigmas_exponential``)."""
    process, T = check_process(process), check_int(T, "T", 1)
    return _schedule_from_nsr(process, np.geomspace(*nsr_range(process), T + 1))


def arctan_schedule(process, T, c):
    """``arctan(nu_i / c)`` uniform in ``i``: Align Your Steps' optimum for an Euler solver on
    ``N(0, c^2 I)`` data (Sabour et al. 2024), ``c`` the data's standard deviation."""
    process, T, c = check_process(process), check_int(T, "T", 1), check_positive(c, "c")
    nu_min, nu_max = nsr_range(process)
    return _schedule_from_nsr(process, c * np.tan(np.linspace(np.arctan(nu_min / c), np.arctan(nu_max / c), T + 1)))


def baseline_schedules(process, T, c=0.5):
    """Every baseline for ``T`` steps, by name: ``uniform``, ``cosine``, ``loglinear``, ``arctan`` (data
    standard deviation ``c``, default EDM's 0.5) and ``edm3``, ``edm7``, ``edm100`` (the paper's rho values)."""
    out = {"uniform": uniform_schedule(process, T), "cosine": cosine_schedule(process, T),
           "loglinear": loglinear_schedule(process, T), "arctan": arctan_schedule(process, T, c)}
    out.update({f"edm{rho}": edm_schedule(process, T, float(rho)) for rho in (3, 7, 100)})
    return out


# -- The equal-cost fixed point (docs/derivations.md, 3) -------------------------

class EqualCostResult(NamedTuple):
    """Outcome of :func:`equal_cost_schedule` and :func:`iterate_schedule`."""
    ts: np.ndarray          # the schedule returned: the last one if converged, else the one of most equal costs
    costs: np.ndarray       # its interval costs L_i
    stderr: np.ndarray      # their standard errors (NaN where the cost gives none)
    converged: bool         # the last update moved no time by more than tol local steps
    n_iter: int             # updates performed
    history: list           # (ts, costs) before each update
    n_evaluations: int = 0  # per-sample score evaluations (rows passed to the score)


def iterate_schedule(costs, ts, *, gamma=0.5, order=2, max_iter=100, tol=1e-4, callback=None):
    """Iterate ``ts <- blend(ts, update_schedule(ts, costs(ts)), gamma)`` to a fixed point: equal costs (derived).

    ``costs(ts)`` returns the interval costs, or ``(costs, stderr)``. Converged when an update
    moves no time by more than ``tol`` times its shorter adjacent step. Safeguard: when an
    update moves the times further than the one before, or back against it (the iteration
    overshoots or oscillates), ``gamma`` is halved, down to 1/64 of its start. If it does not
    converge, the schedule of most equal costs seen (least spread of ``log L_i``) is returned.
    ``callback(iteration, max_iter, info)`` after every update, ``info`` with ``ts``,
    ``costs``, ``moved``, ``gamma`` and ``elapsed``; it may raise ``StopIteration`` to stop.
    """
    ts = check_schedule(ts, endpoints=False)
    gamma, order = check_gamma(gamma), check_positive(order, "order")
    max_iter, tol = check_int(max_iter, "max_iter", 1), check_positive(tol, "tol")
    callback = None if callback is None else check_callable(callback, "callback", "callback(done, total, info)")
    return _iterate(costs, ts, gamma, order, max_iter, tol, callback)


def _iterate(costs, ts, gamma, order, max_iter, tol, callback):
    start, history, best, moved_before, moved, floor = time.perf_counter(), [], None, np.inf, np.inf, gamma / 64
    direction_before = None

    def evaluate(ts):
        out = costs(ts)
        value, stderr = out if isinstance(out, tuple) else (out, np.full(len(ts) - 1, np.nan))
        return check_costs(value, len(ts) - 1), np.asarray(stderr, dtype=float)

    for it in range(1, max_iter + 1):
        L, stderr = evaluate(ts)
        history.append((ts, L))
        spread = float(np.ptp(np.log(np.maximum(L, 1e-300))))
        best = (spread, ts, L, stderr) if best is None or spread < best[0] else best
        ts_new = _blend(ts, _invert_cumulative(ts, L ** (1.0 / order), len(ts) - 1), gamma)
        direction = _relative_moves(ts, ts_new)
        reverses = direction_before is not None and float(direction @ direction_before) < 0.0
        moved, ts, direction_before = float(np.max(np.abs(direction))), ts_new, direction
        try:
            if callback is not None:
                callback(it, max_iter, {"ts": ts, "costs": L, "moved": moved, "gamma": gamma,
                                        "elapsed": time.perf_counter() - start})
        except StopIteration:
            break
        if moved <= tol:
            break
        gamma, moved_before = (max(gamma / 2, floor) if moved > moved_before or reverses else gamma), moved
    L, stderr = evaluate(ts)
    if moved <= tol:
        return EqualCostResult(ts, L, stderr, True, it, history)
    if float(np.ptp(np.log(np.maximum(L, 1e-300)))) > best[0]:
        L, stderr, ts = best[2], best[3], best[1]
    return EqualCostResult(ts, L, stderr, False, it, history)


def _relative_moves(ts, ts_new):
    """Each time's move, signed, in units of the shorter of its two adjacent steps."""
    steps = np.diff(ts)
    local = np.minimum(np.append(steps, np.inf), np.insert(steps, 0, np.inf))
    return (ts_new - ts) / local


def equal_cost_schedule(score, process, ts, x0, rng, *, cost=None, order=None, max_iter=100, tol=1e-4,
                        batch_size=None, callback=None, **cost_options):
    """The damped Algorithm 1 iterated to its equal-cost fixed point for a fixed score (derived).

    Algorithm 2 with the model held fixed (:func:`iterate_schedule`, ``gamma`` from 1): its
    fixed points have equal interval costs whatever the order of the cost, which is how
    schedules for costs of higher order are found (docs/derivations.md, 3): the predictor cost
    (``O(h^4)``, the default ``cost``) and ``sampler.flow_error_cost``. Costs are estimated by
    :func:`interval_costs` with the same seed at every iteration (common random numbers), so
    the map iterated is deterministic. ``order``: the update's (2 for the corrector cost, 4
    otherwise by default); it sets how far an update moves. ``max_iter``, ``tol``, ``callback``
    as :func:`iterate_schedule` (``info`` also has ``evaluations`` so far; a budget is a
    callback, :func:`stop_at_budget`). ``batch_size``: at most this many rows per score call.
    ``cost_options`` are passed to ``cost``. A result that did not converge is warned of.

    With the corrector cost, smooth data and few steps the iteration drifts towards one huge
    last step (``v(t_min)^2 = sigma_min^2`` makes it look free: docs/derivations.md, 4);
    prefer :func:`estimate_schedule_map` for the corrector cost. Returns an
    :class:`EqualCostResult` whose ``n_evaluations`` counts the rows passed to the score.

    >>> gauss = lambda x, t: -x / (0.25 + ve().sigma(t) ** 2)          # exact score of N(0, 0.5^2) data
    >>> x0 = 0.5 * np.random.default_rng(0).standard_normal((400, 1))
    >>> r = equal_cost_schedule(gauss, ve(), uniform_schedule(ve(), 4), x0, 0)
    >>> r.converged, float(r.ts[0]), float(r.ts[-1]), bool(np.ptp(np.log(r.costs)) < 0.2)   # equal costs
    (True, 0.0, 1.0, True)
    """
    process = check_process(process)
    ts = check_schedule(ts, process)
    cost = resolve(predictor_cost if cost is None else cost, COSTS, "cost")
    score = guest_score(score, batch_size=batch_size, process=process)
    x0, seed = check_data(x0), int(as_rng(rng).integers(2 ** 63))
    order = (2 if cost is corrector_cost else 4) if order is None else check_positive(order, "order")
    user = None if callback is None else check_callable(callback, "callback", "callback(done, total, info)")

    def report(it, total, info):
        if user is not None:
            user(it, total, dict(info, evaluations=score.evaluations))

    result = _iterate(lambda ts: interval_costs(score, process, ts, x0, seed, cost=cost, **cost_options), ts, 1.0,
                      order, check_int(max_iter, "max_iter", 1), check_positive(tol, "tol"), report)
    if not result.converged:
        updates = f"{result.n_iter} update" + "s" * (result.n_iter != 1)
        warnings.warn(f"the equal-cost iteration did not converge in {updates} (a time still moved by more than "
                      f"tol = {tol:g} of its local step); returning the schedule of most equal costs seen",
                      RuntimeWarning, stacklevel=2)
    return result._replace(n_evaluations=score.evaluations)


def stop_at_budget(budget, callback=None):
    """A callback for :func:`equal_cost_schedule` that stops the updates before the next one (and the final
    evaluation of the costs) would spend more than ``budget`` per-sample score evaluations; it measures what
    one evaluation of the costs spends on the first update. ``callback`` is called too, if given.

    >>> gauss = lambda x, t: -x / (0.25 + ve().sigma(t) ** 2)
    >>> x0 = 0.5 * np.random.default_rng(0).standard_normal((400, 1))
    >>> import warnings
    >>> with warnings.catch_warnings():                       # stopped on purpose: it says it did not converge
    ...     warnings.simplefilter("ignore")
    ...     r = equal_cost_schedule(gauss, ve(), uniform_schedule(ve(), 4), x0, 0, callback=stop_at_budget(10_000))
    >>> r.n_evaluations <= 10_000, r.converged                  # 3,200 per evaluation of the costs
    (True, False)
    """
    budget = check_int(budget, "budget", 1)

    def stop(it, total, info):
        if callback is not None:
            callback(it, total, info)
        per_evaluation = info["evaluations"] / it
        if it == 1 and 2 * per_evaluation > budget:
            raise ValueError(f"`budget` = {budget} allows no update: one evaluation of the costs spends "
                             f"{int(per_evaluation)} per-sample score evaluations, and an update needs two")
        if info["evaluations"] + 2 * per_evaluation > budget:
            raise StopIteration
    return stop


# -- The schedule map: the paper's dense-grid route, on a budget, in parallel, with error bars --
# (docs/derivations.md, 5)

class ScheduleMap(NamedTuple):
    """A continuous schedule: the cumulative length on a dense grid.

    Fields: ``ts`` grid, ``delta`` and ``delta_stderr`` local cost, ``Lambda`` cumulative length,
    ``length`` and ``length_stderr`` (batch means over ``Lambda_groups``, the cumulative lengths
    of independent sample groups), ``order``, ``n_evaluations`` (per-sample score evaluations),
    ``metadata`` (the process, ``nu`` on the grid, the settings: :func:`estimate_schedule_map`)
    and ``grid_error`` (the quadrature error of ``length``, from the same map at half
    resolution). :meth:`schedule` gives any number of steps; :meth:`sigmas`, :meth:`timesteps`
    and :meth:`flow_times` export it; :meth:`save` writes JSON (:func:`load_schedule_map`).
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
        """A ``level`` confidence interval ``length +- q length_uncertainty``, ``q`` the Student-t quantile of
        the batch means' ``groups - 1`` degrees of freedom (2.26, not 1.96, for 10 groups at 95%)."""
        level = check_real(level, "level")
        if not 0.0 < level < 1.0:
            raise ValueError(f"`level` must be in (0, 1), got {level}")
        half = float(stdtrit(max(len(self.Lambda_groups) - 1, 1), 0.5 + level / 2.0)) * self.length_uncertainty
        return self.length - half, self.length + half

    def schedule(self, T):
        """The optimal ``T``-step schedule ``Lambda^{-1}(i Lambda / T)``: a monotone cubic through
        ``(Lambda_j, log nu_j)``, the coordinate in which the grid is uniform, then to ``t``."""
        return self._invert(self.Lambda, check_int(T, "T", 1))

    def _invert(self, Lambda, T):
        u = np.log(self._nu_grid())
        ts = _pin(PchipInterpolator(u, self.ts)(_invert_cumulative(u, np.diff(Lambda), T)), self.ts[0], self.ts[-1])
        if not np.all(np.diff(ts) > 0):
            raise ValueError(f"`T` = {T} is too large for the resolution of the grid: two schedule times coincide")
        return ts

    def _nu_grid(self):
        nu = np.asarray((self.metadata or {}).get("nu", []), dtype=float)
        if nu.shape != self.ts.shape:
            raise ValueError("this map has no `nu` on its grid (metadata['nu']); it cannot be inverted or exported")
        return nu

    def cost_per_step(self, T):
        """Leading-order cost of every step of the optimal ``T``-step schedule, ``(Lambda / T)^order``."""
        return (self.length / check_int(T, "T", 1)) ** self.order

    def schedule_stderr(self, T):
        """Standard error of each time of :meth:`schedule` (batch means over the groups)."""
        groups = np.array([self._invert(L, check_int(T, "T", 1)) for L in self.Lambda_groups])
        return groups.std(axis=0, ddof=1) / np.sqrt(len(groups))

    def sigmas(self, n, *, dtype=np.float64):
        """``n`` noise levels ``nu``, descending, then 0: the convention of k-diffusion's
        ``get_sigmas_karras(n, ...)`` and diffusers' ``set_timesteps(sigmas=...)``.

        With Euler that is ``n`` model calls: the ``n - 1`` steps of ``schedule(n - 1)`` and a last
        one from ``nu_min`` to 0 (the final denoising). ``dtype`` (e.g. ``np.float32``) for a model
        that computes in it: float64 sigmas turn float32 samples into float64 after one step.
        """
        n = check_int(n, "n", 2)
        log_nu = _invert_cumulative(np.log(self._nu_grid()), np.diff(self.Lambda), n - 1)
        return _levels_apart(np.append(np.exp(log_nu)[::-1], 0.0), _check_dtype(dtype), "n")

    def timesteps(self, process, n):
        """``n`` integer timesteps of a discrete-time model, descending (diffusers' ``timesteps=``):
        ``schedule(n - 1)`` on the table; ``process`` must be the map's own (the same table)."""
        process = self._check_process_matches(process)
        if process.n_timesteps < 2:
            raise ValueError("`process` must come from `process_from_alphas_cumprod` (a discrete-time model)")
        return _table_timesteps(self.schedule(check_int(n, "n", 2) - 1), process.n_timesteps, False, "levels `n`")

    def flow_times(self, process, n, *, from_one=True, dtype=np.float64):
        """``n`` flow-matching times, descending, the times of ``schedule(n - 1)``, for diffusers'
        ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` (which appends the 0);
        ``from_one=True`` starts at ``t = 1``, where such models start, not at the map's ``t_max``.
        ``process`` must be the map's, a :func:`flow_matching` process."""
        process = self._check_process_matches(process)
        if not process.name.startswith("flow_matching"):
            raise ValueError(f"`process` must be a flow_matching process for flow times, got {process.name!r}")
        t = self.schedule(check_int(n, "n", 2) - 1)[::-1].copy()
        if check_bool(from_one, "from_one"):
            t[0] = 1.0
        return _levels_apart(t, _check_dtype(dtype), "n")

    def _check_process_matches(self, process):
        process = check_process(process)
        recorded = (self.metadata or {}).get("process")
        if recorded is None:
            raise ValueError("this map does not record its process (`metadata.process`: a hand-edited or old file), "
                             f"so it cannot be matched to {process.name!r}: estimate it again to export timesteps or "
                             "flow times; its sigmas(n) still work")
        digest = (self.metadata or {}).get("process_digest")
        if recorded == process.name and digest is not None and digest != process_digest(process):
            raise ValueError(f"this map was estimated with another process named {recorded!r} (its s or sigma "
                             "differ: the process digests differ); pass the map's own process")
        if recorded != process.name:
            old_table = recorded.startswith("alphas_cumprod(") and "," not in recorded
            raise ValueError(f"this map was estimated with the process {recorded!r}, not {process.name!r}: its noise "
                             "levels do not translate into that process's timesteps"
                             + ("; the map names its table by length only (saved before 0.3), so it cannot be "
                                "matched to a table: estimate it again" if old_table else ""))
        return process

    def save(self, path):
        """Write the map as JSON, atomically (:func:`write_atomically`), after checking it by the rules
        :func:`load_schedule_map` applies: a map its loader would refuse (a non-finite value, ``Lambda = 0``
        from a model that does not depend on ``t``, ...) is a ``ValueError`` naming the field, and the file
        at ``path`` is left as it was."""
        data = {"format": SCHEDULE_MAP_FORMAT, "metadata": self.metadata or {}, "order": self.order,
                "length": self.length, "length_stderr": self.length_stderr, "grid_error": self.grid_error,
                "n_evaluations": self.n_evaluations}
        data.update({k: getattr(self, k) for k in ("ts", "delta", "delta_stderr", "Lambda", "Lambda_groups")})
        text = json.dumps({k: _jsonable(v, k) for k, v in data.items()}, allow_nan=False)
        try:
            _schedule_map_from_json(json.loads(text))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"cannot save this map to `{path}`: its loader would refuse it: {err}") from None
        write_atomically(path, text)


def _levels_apart(values, dtype, name):
    """Descending ``values`` cast to ``dtype``; an error if the cast makes two of them equal (float16 holds
    about 3 significant digits and nothing below 6e-8)."""
    cast = values.astype(dtype)
    if np.any(np.diff(cast) >= 0):
        raise ValueError(f"`dtype` {dtype} cannot hold these {len(values)} levels apart: two of them round to the "
                         f"same value; use a wider dtype (float32) or a smaller `{name}`")
    return cast


MAP_GROUPS = 10          # independent sample groups of a map, for its batch-means error bars
STALL_SECONDS = 60.0     # a process pool that returns nothing for this long is warned of


def estimate_schedule_map(score, process, x0, rng, *, n_grid=1000, velocity=None, derivative=None, budget=None,
                          workers=1, control_variate=None, batch_size=None, callback=None):
    """The paper's dense-grid route for a fixed model: ``delta_c`` on a grid, ``Lambda``, any ``T``
    (its numerics are derived here: docs/derivations.md, 5).

    ``delta_c`` is estimated as in :func:`local_cost` at ``n_grid`` times uniform in ``log nu``
    and integrated by :func:`cumulative_cost` in ``log nu``. The samples are split into
    ``MAP_GROUPS`` groups whose cumulative lengths give batch-means error bars for ``Lambda``
    and the schedule; the same integral over every other level gives the quadrature error
    (``grid_error``, Richardson: a third of the difference). Data at a scale the process never
    reaches is warned of; a score that does not depend on ``t`` (to rounding) is warned of.

    Parameters
    ----------
    score : ``score(x, t) -> (n, d)``, called with a level's whole batch (2 calls per level, 3 at
        the ends), or chunks of at most ``batch_size`` rows (results identical)
    process, x0, rng : the process, data ``(n, d)`` and a Generator or int seed
    n_grid, velocity, derivative : grid size, ``v(t)`` and ``dS/dt`` as in :func:`local_cost`
    budget : at most this many per-sample score evaluations: ``n_grid = sqrt(budget / 40)``
        levels (clipped to [20, 1000]) and as many rows of ``x0`` as fit (docs/budget.md)
    workers : SciPy's convention: 1 (serial), an int n > 1 (a pool of n processes started by
        ``forkserver`` or ``spawn``, never ``fork``, so that a model that runs threads is safe;
        ``score`` and ``process`` must pickle), -1 (one per CPU), or a map-like callable
        ``workers(func, iterable)`` such as ``multiprocessing.get_context("spawn").Pool(4).map``
        or Dask's ``client.get_executor().map``. One task per level; the noise is drawn here,
        so the result is identical for every ``workers``; what comes back is checked.
    control_variate : subtract the data's Gaussian fit's centred local cost (known mean): less
        variance near Gaussian marginals. Default: on with ``budget``, off without.
    callback : ``callback(level, n_grid, info)`` after every level (``evaluations``, ``elapsed``)

    Returns a :class:`ScheduleMap`; ``metadata`` records the process (name, range, ``nu`` on the
    grid), the settings, evaluations, score calls, seed (if an int was given), version and time.

    >>> gauss = lambda x, t: -x / (0.25 + ve().sigma(t) ** 2)          # exact score of N(0, 0.5^2) data
    >>> x0 = 0.5 * np.random.default_rng(0).standard_normal((400, 1))
    >>> smap = estimate_schedule_map(gauss, ve(), x0, 0, n_grid=50)
    >>> round(smap.length, 1), len(smap.schedule(10))                    # closed form: Lambda = 9.54
    (9.5, 11)
    """
    plan = _map_plan(score, process, x0, rng, n_grid, velocity, derivative, budget, workers, control_variate,
                     batch_size, callback)
    delta, delta_stderr, groups, counts = _map_levels(plan)
    u = np.log(process.nsr(plan.ts))
    dt_du = 1.0 / np.abs(elementwise_grad(lambda t: anp.log(process.nsr(t)))(plan.ts))
    Lambda_of = lambda u, delta: np.concatenate([[0.0], np.cumsum(_trapezoid_increments(u, delta, 2))])
    metric = dt_du ** 2                       # delta in log nu: delta_u = delta_t (dt/du)^2
    delta, groups = np.maximum(delta, 0.0), np.maximum(groups, 0.0)   # a control variate's mean may dip below 0
    Lambda = Lambda_of(u, delta * metric)
    group_Lambda = np.array([Lambda_of(u, g * metric) for g in groups])
    half = np.unique(np.append(np.arange(0, len(u), 2), len(u) - 1))    # Richardson: the same on every other level
    grid_error = abs(float(Lambda[-1]) - float(Lambda_of(u[half], (delta * metric)[half])[-1])) / 3
    if not np.any(delta > 0):
        warnings.warn("the score does not depend on t: its time derivative is zero (to rounding) at every level, so "
                      "every schedule is free and Lambda = 0; check that the model's time or noise-level input is "
                      "used", RuntimeWarning, stacklevel=2)
    metadata = dict(plan.metadata, nu=np.exp(u).tolist(), n_evaluations=counts[1], n_calls=counts[0],
                    created=datetime.now(timezone.utc).isoformat())
    return ScheduleMap(plan.ts, delta, delta_stderr, Lambda, float(Lambda[-1]),
                       float(group_Lambda[:, -1].std(ddof=1) / np.sqrt(MAP_GROUPS)), group_Lambda, 2, counts[1],
                       metadata, grid_error)


class _MapPlan(NamedTuple):
    task: Callable           # one level's work, picklable: task((j, x, t, v2)) -> (j, values, calls, rows, warnings)
    process: Process
    x0: np.ndarray
    rng: np.random.Generator
    ts: np.ndarray
    velocity: Callable
    control_variate: bool
    workers: object
    callback: Callable
    metadata: dict


def _map_plan(score, process, x0, rng, n_grid, velocity, derivative, budget, workers, control_variate, batch_size,
              callback):
    """Check :func:`estimate_schedule_map`'s arguments once; choose the grid and the samples."""
    process = check_process(process)
    score = guest_score(score, batch_size=batch_size, process=process)
    x0 = check_data_range(check_data(x0))
    check_data_scale(np.mean(x0 ** 2, axis=0), process)
    seed = int(rng) if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) else None
    rng, derivative = as_rng(rng), resolve(central_difference if derivative is None else derivative, DERIVATIVES,
                                           "derivative")
    control_variate = (budget is not None) if control_variate is None else check_bool(control_variate,
                                                                                       "control_variate")
    if budget is not None:
        n_grid = int(np.clip(np.rint(np.sqrt(check_int(budget, "budget", 1) / 40)), 20, 1000))
    ts = _schedule_from_nsr(process, np.geomspace(*nsr_range(process), check_int(n_grid, "n_grid", 2)))
    if budget is not None:
        steps = _fd_steps(process, ts, 1e-3)
        one_sided = np.sum((ts - steps < process.t_min) | (ts + steps > process.t_max))
        x0 = x0[:min(len(x0), budget // (n_grid if derivative is forward_mode else 2 * n_grid + one_sided))]
    groups = check_int(MAP_GROUPS, "scoreopt.MAP_GROUPS", 2)
    if len(x0) < 2 * groups:
        raise ValueError(f"`x0` needs at least {2 * groups} samples for {groups} groups"
                         + ("" if budget is None else f" (the budget allows {len(x0)})"))
    if hasattr(workers, "map") and not callable(workers):
        raise TypeError(f"`workers` is a {type(workers).__name__}; pass its map method (workers=pool.map), a "
                        "map-like callable workers(func, iterable), or a number of processes")
    if not (callable(workers) or check_int(workers, "workers", -1) not in (0,)):
        raise ValueError("`workers` must be a positive int, -1, or a map-like callable workers(func, iterable)")
    metadata = {"process": process.name, "process_digest": process_digest(process), "t_min": process.t_min,
                "t_max": process.t_max,
                "n_timesteps": process.n_timesteps, "cost": "corrector",
                "velocity": "sigma" if velocity is None else getattr(velocity, "__name__", "custom"),
                "derivative": derivative.__name__, "n_grid": len(ts), "n_samples": len(x0), "n_groups": MAP_GROUPS,
                "budget": budget, "control_variate": control_variate, "batch_size": score.batch_size, "seed": seed,
                "version": _version()}
    return _MapPlan(partial(_level_task, score.score, process, derivative, score.batch_size), process, x0, rng, ts,
                    check_velocity(velocity, process), control_variate, workers,
                    None if callback is None else check_callable(callback, "callback", "callback(done, total, info)"),
                    metadata)


def check_data_range(x, name="x0"):
    """``x`` if float64 arithmetic on it is sound: its largest magnitude is refused above 1e150 (its squares
    overflow) and, unless it is all zero, below 1e-150 (its squares underflow to 0), naming the scale."""
    top = float(np.max(np.abs(x)))
    if top > 1e150 or 0 < top < 1e-150:
        raise ValueError(f"`{name}` holds values of magnitude up to {top:.3g}: their squares "
                         f"{'overflow' if top > 1 else 'underflow'} in float64, so no variance or cost is sound; "
                         "rescale the data (to about unit scale)")
    return x


def _level_task(score, process, derivative, batch_size, task):
    """One level's work, wherever it runs: ``(j, x, t, v2)`` -> ``(j, delta_c integrand per row, calls, rows,
    the messages of the warnings raised)``; the caller warns of each message once."""
    j, x, t, v2 = task
    checked = checked_score(score, batch_size=batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = local_cost_samples(checked, process, x, t, derivative, v2)
    return j, values, checked.calls, checked.evaluations, sorted({str(w.message) for w in caught})


def _map_levels(plan):
    """Run the levels (a few at a time), apply the control variate, accumulate each level's mean, standard
    error and group means. Returns ``(delta, delta_stderr, group_delta, (calls, evaluations))``."""
    n, start, calls, evaluations, said = len(plan.ts), time.perf_counter(), 0, 0, set()
    delta, delta_stderr, groups = np.empty(n), np.empty(n), np.empty((MAP_GROUPS, n))
    moments = _group_moments(plan.x0, MAP_GROUPS) if plan.control_variate else None
    with _level_map(plan.workers, plan.task) as (mapper, chunk):
        for first in range(0, n, chunk):
            levels = range(first, min(first + chunk, n))
            tasks = [(j, noised(plan.process, plan.x0, plan.ts[j], plan.rng), plan.ts[j],
                      float(plan.velocity(plan.ts[j])) ** 2) for j in levels]      # the noise is drawn here, in order
            for (j, x, t, v2), (values, n_calls, rows, messages) in zip(tasks, _checked_results(
                    mapper(plan.task, tasks), levels, len(plan.x0))):
                calls, evaluations = calls + n_calls, evaluations + rows
                for message in set(messages) - said:
                    warnings.warn(message, RuntimeWarning, stacklevel=4)
                said.update(messages)
                if moments is not None:
                    values = _gaussian_control(values, plan.process, x, t, v2, *moments)
                delta[j], delta_stderr[j] = mean_stderr(values)
                groups[:, j] = [g.mean() for g in np.array_split(values, MAP_GROUPS)]
                if plan.callback is not None:
                    plan.callback(j + 1, n, {"evaluations": evaluations, "elapsed": time.perf_counter() - start})
    return delta, delta_stderr, groups, (calls, evaluations)


def _checked_results(results, levels, n):
    """The results of a level map, checked: one per task, ``(j, values (n,), calls, rows, messages)`` with
    finite values, put in task order (a map that returns in completion order is fine)."""
    by_level = {}
    for item in results:
        if not (isinstance(item, tuple) and len(item) == 5):
            raise ValueError(f"`workers` returned {type(item).__name__} where a level's result was expected: the "
                             "map must return func(task) for every task")
        j, values, calls, rows, messages = item
        values = np.asarray(values, dtype=float)
        if values.shape != (n,) or not np.all(np.isfinite(values)):
            raise ValueError(f"`workers` returned a {'non-finite' if values.shape == (n,) else 'wrong-shaped'} "
                             f"result for level {j}")
        by_level[int(j)] = (values, int(calls), int(rows), list(messages))
    missing = [j for j in levels if j not in by_level]
    if missing or len(by_level) != len(levels):
        raise ValueError(f"`workers` returned {len(by_level)} results for {len(levels)} tasks (levels {missing[:5]} "
                         "missing): the map must return one result per task")
    return [by_level[j] for j in levels]


@contextmanager
def _level_map(workers, func):
    """``(map, chunk)`` for ``workers`` in SciPy's convention; ``chunk`` levels are in memory at once. An int
    n > 1 is a pool of n processes started by forkserver (spawn where there is none): ``fork`` deadlocks a
    child whose parent runs threads (PyTorch, OpenMP). Each worker exits when this process dies."""
    if callable(workers):
        yield workers, 16
        return
    if workers == 1:
        yield map, 1
        return
    if getattr(multiprocessing.current_process(), "_inheriting", False):     # a worker importing the script
        raise RuntimeError(f"`workers` = {workers}: a pool is being started while a worker process imports the "
                           "script that started it: put the script's top-level code under `if __name__ == "
                           "'__main__':` (every worker imports the script again and runs its module-level code)")
    try:
        blob = pickle.dumps(func)
    except Exception as err:
        raise TypeError(f"`workers` = {workers} runs the score in other processes, so the score and the process "
                        f"must pickle, and they do not ({type(err).__name__}: {err}). Define the model at module "
                        "level, use the adapters (they pickle when the model does), or pass a map-like callable "
                        "such as concurrent.futures.ThreadPoolExecutor(4).map") from None
    check_positive(STALL_SECONDS, "scoreopt.STALL_SECONDS")
    n = (os.cpu_count() or 1) if workers == -1 else int(workers)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(n, multiprocessing.get_context(method), _watch_parent, (os.getpid(),))
    try:
        yield partial(_pool_map, pool, blob), 4 * n
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool_map(pool, blob, func, tasks):
    """``map(func, tasks)`` on a process pool, in order, ``func`` sent pickled (``blob``) so that a worker that
    cannot load it says so. Says so when no result comes for ``STALL_SECONDS``; a pool that breaks is an error
    naming the levels and the cause its workers' exit codes tell (:func:`_broken_pool_cause`)."""
    futures = [(task[0], pool.submit(_call_pickled, blob, task)) for task in tasks]
    processes = list(getattr(pool, "_processes", None) or {})
    processes = [pool._processes[pid] for pid in processes if pid in pool._processes]
    for j, future in futures:
        while not wait([future], timeout=STALL_SECONDS).done:
            warnings.warn(f"the process pool has returned nothing for {STALL_SECONDS:g} s (level {j}): a worker may be "
                          "stuck; a level takes as long as the score on the whole batch", RuntimeWarning, stacklevel=5)
        try:
            yield future.result()
        except BrokenProcessPool:
            lost = [k for k, f in futures if not f.done() or isinstance(f.exception(), BrokenProcessPool)]
            raise ScoreEvaluationError(f"a worker process died while the map computed levels {lost[0]} to {lost[-1]}: "
                                       + _broken_pool_cause(processes)) from None


def _call_pickled(blob, task):
    """A pool task: load the level's function from ``blob``, then run it; a function the worker cannot load
    (defined under the script's ``if __name__ == "__main__":``, or in a module the worker cannot import) is a
    ``TypeError`` saying so."""
    try:
        func = pickle.loads(blob)
    except Exception as err:
        raise TypeError(f"a worker process could not load the score ({type(err).__name__}: {err}): a score run by "
                        "`workers` must be importable by the workers: defined at module level, outside `if __name__ "
                        "== '__main__':`, in a module on their path") from None
    return func(task)


def _broken_pool_cause(processes):
    """Why the workers of a broken pool died, from their exit codes and the forkserver."""
    for p in processes:
        p.join(1.0)
    codes = [p.exitcode for p in processes if p.exitcode is not None]
    memory = (" (often by the system for lack of memory: each worker holds a copy of the model and a level's batch; "
              "use fewer workers or a smaller batch_size)")
    signals = sorted({-c for c in codes if c < 0} - ({15} if any(c not in (0, -15) for c in codes) else set()))
    if signals:                                # SIGTERM is how the pool stops the others once one has died
        return f"it was killed by {', '.join(map(_signal_name, signals))}" + (memory if 9 in signals else "")
    server = getattr(getattr(multiprocessing, "forkserver", None), "_forkserver", None)
    server_pid = getattr(server, "_forkserver_pid", None)
    if server_pid is not None and processes and not _process_alive(server_pid) or server_pid is None and 255 in codes:
        return ("the forkserver that starts and watches the workers was killed, so the pool lost them; run the map "
                "again (a new forkserver starts)")
    if 255 in codes:                           # the forkserver lives, but the worker's status did not reach us
        return "its exit status was lost; it was most likely killed, by SIGKILL" + memory
    if any(c > 0 for c in codes):
        return ("it exited with an error before returning a result (its traceback is on stderr): often a script "
                "whose top-level code is not under `if __name__ == '__main__':` (every worker imports the script "
                "again and runs its module-level code), or an import that fails in a fresh process")
    return "it crashed or was stopped; its exit status is unknown"


def _signal_name(number):
    import signal
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _watch_parent(pid):
    """Pool worker initialiser: die with the process ``pid`` that made the pool (SIGTERM, SIGKILL), rather than
    wait forever on the task queue holding a copy of the model.

    On Linux a guard process (:data:`_GUARD`) SIGKILLs the worker when ``pid`` exits, whatever the worker is
    running, a C call that holds the GIL included; the forkserver and the resource tracker then exit, as they
    do once the pipes the workers held are closed. Elsewhere, and as a fallback, a thread of the worker polls
    ``pid`` every 0.5 s (it needs the GIL)."""
    parent = os.getppid()
    _start_guard(pid)

    def watch():
        while _process_alive(pid) and os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    if os.name == "posix":
        threading.Thread(target=watch, daemon=True).start()


# The guard of a pool worker: a small Python process (no NumPy) that SIGKILLs the worker (argv[1]) when the
# process that made the pool (argv[2]) exits, and dies with the worker (PR_SET_PDEATHSIG); Linux only.
_GUARD = """
import ctypes, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C reaches the whole process group
worker, parent = int(sys.argv[1]), int(sys.argv[2])
ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)   # PR_SET_PDEATHSIG: go when the worker goes
if os.getppid() != worker:
    sys.exit()
try:
    select.select([os.pidfd_open(parent)], [], [])    # readable once the parent has exited
except (AttributeError, OSError):                     # no pidfd (Linux < 5.3), or the parent is gone
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(0.2)
if os.getppid() == worker:                            # still the worker's child: never a reused pid
    os.kill(worker, signal.SIGKILL)
"""
_guards = []             # a worker's guard (kept referenced while the worker lives)


def _start_guard(pid):
    """Start this worker's guard (Linux); whether it started."""
    if not sys.platform.startswith("linux"):
        return False
    import subprocess
    try:
        _guards.append(subprocess.Popen([sys.executable, "-I", "-c", _GUARD, str(os.getpid()), str(pid)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    except OSError:
        return False
    return True


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


def _group_moments(x0, n_groups):
    """Per-row mean and variance of the row's sample group (as in the batch means), each (n, d)."""
    mean, var = np.empty_like(x0), np.empty_like(x0)
    for g in np.array_split(np.arange(len(x0)), int(n_groups)):
        mean[g], var[g] = x0[g].mean(axis=0), x0[g].var(axis=0)
    return mean, var


def _gaussian_control(values, process, x, t, v2, mean, var):
    """Control variate from the data's Gaussian fit N(mean, diag var) (docs/derivations.md, 5.2).

    Its score ``-(x - s mean)/A``, ``A = s^2 var + sigma^2``, has the per-sample local cost
    ``g = v^2 ||s' mean / A + (x - s mean) A' / A^2||^2`` whose mean under the noising depends on
    the first two moments only, ``E g = v^2 sum_k [s'^2 mean_k^2 / A_k^2 + A'_k^2 / A_k^3]``; the
    moments are each row's group's, so the groups stay independent. Returns
    ``values - beta (g - E g)``, ``beta`` the variance-minimising coefficient of this level.
    """
    s, sigma = float(process.s(t)), float(process.sigma(t))
    s_dot, sigma_dot = (float(elementwise_grad(f)(float(t))) for f in (process.s, process.sigma))
    A, A_dot = s ** 2 * var + sigma ** 2, 2 * s * s_dot * var + 2 * sigma * sigma_dot
    g = v2 * np.sum((s_dot * mean / A + (x - s * mean) * A_dot / A ** 2) ** 2, axis=1)
    centred = g - v2 * np.sum(s_dot ** 2 * mean ** 2 / A ** 2 + A_dot ** 2 / A ** 3, axis=1)
    c = centred - centred.mean()
    denominator = np.dot(c, c)
    return values - (np.dot(values - values.mean(), c) / denominator if denominator > 0 else 0.0) * centred


def _version():
    try:
        return package_version("scoreopt")
    except Exception:           # not installed (a vendored copy)
        return "unknown"


# -- Your model: processes of other conventions, adapters, exports ---------------

def _flow_s(t):
    return 1.0 - t


def _flow_sigma(t):
    return 1.0 * t


def flow_matching(t_min=0.002 / 1.002, t_max=80.0 / 81.0):
    """Flow matching / rectified flow: ``s = 1 - t``, ``sigma = t``, so ``x_t = (1 - t) x_0 + t eps``.

    ``nu = t / (1 - t)`` is infinite at ``t = 1``, so ``t_max < 1``; the default range is EDM's
    ``nu`` in ``[0.002, 80]``. :meth:`ScheduleMap.flow_times` exports from ``t = 1``, where such
    models start; a velocity model becomes a score through :func:`score_from_flow`.

    >>> p = flow_matching()
    >>> round(float(p.nsr(p.t_min)), 4), round(float(p.nsr(p.t_max)), 1)    # EDM's range of nu
    (0.002, 80.0)
    """
    t_min, t_max = check_real(t_min, "t_min"), check_real(t_max, "t_max")
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError(f"need 0 < `t_min` < `t_max` < 1 for flow_matching, got {t_min}, {t_max}")
    return Process(_flow_s, _flow_sigma, t_min, t_max, f"flow_matching({t_min:.6g}, {t_max:.6g})")


def _table_log_snr(log_snr, t):
    """Piecewise linear in ``t`` through ``(k / (N - 1), log_snr[k])``."""
    u = t * (len(log_snr) - 1)
    k = np.clip(np.floor(np.asarray(getval(u))), 0, len(log_snr) - 2).astype(int)
    return log_snr[k] + (u - k) * (log_snr[k + 1] - log_snr[k])


def _sigmoid_sqrt(log_snr, sign, t):
    return anp.sqrt(1.0 / (1.0 + anp.exp(-sign * _table_log_snr(log_snr, t))))


def process_from_alphas_cumprod(alphas_cumprod):
    """The process of a discrete-time model on a table ``alphas_cumprod[k]``, k = 0..N-1 (diffusers' DDPM/DDIM).

    Timestep ``k`` has ``x = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` at time ``t_k = k / (N - 1)``;
    between the table's points the log-SNR ``log(abar / (1 - abar))`` is linear in ``t``, so the
    process is exact at every table point and :func:`to_timesteps` maps schedules back to the
    model's timesteps. The table must be strictly decreasing in ``(0, 1)`` with a log-SNR that
    falls by more than 1e-9 at every step. The process's name carries the table's length and a
    hash of its content, so a map of one table refuses to export timesteps for another.

    >>> alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))      # DDPM's "linear" table
    >>> p = process_from_alphas_cumprod(alphas_cumprod)
    >>> p.n_timesteps, bool(np.isclose(p.s(0.0) ** 2, alphas_cumprod[0]))
    (1000, True)
    """
    abar = as_real_array(alphas_cumprod, "alphas_cumprod")
    if abar.ndim != 1 or len(abar) < 2 or not np.all(np.isfinite(abar)) or np.any((abar <= 0) | (abar >= 1)):
        raise ValueError("`alphas_cumprod` must be a 1-D table of at least 2 values strictly between 0 and 1")
    if not np.all(np.diff(abar) < 0):
        raise ValueError("`alphas_cumprod` must be strictly decreasing (noise grows with the timestep)")
    log_snr = np.log(abar) - np.log1p(-abar)
    flat = np.flatnonzero(np.diff(log_snr) > -1e-9)
    if len(flat):
        raise ValueError(f"`alphas_cumprod` is too flat: its log-SNR falls by {-np.diff(log_snr)[flat[0]]:.3g} from "
                         f"entry {flat[0]} to {flat[0] + 1} (at least 1e-9 is needed to tell the levels apart)")
    digest = hashlib.sha256(abar.tobytes()).hexdigest()[:12]
    return Process(partial(_sigmoid_sqrt, log_snr, 1.0), partial(_sigmoid_sqrt, log_snr, -1.0), 0.0, 1.0,
                   f"alphas_cumprod(N={len(abar)}, sha256 {digest})", len(abar))


def to_timesteps(process, ts, *, merge=False):
    """The call levels ``ts`` as a discrete-time model's integer timesteps, descending (diffusers' order).

    ``k = round(t (N - 1))`` for a process from :func:`process_from_alphas_cumprod`. Two times that
    round to the same timestep are an error, or with ``merge=True`` are merged with a
    ``RuntimeWarning`` saying how many levels remain.

    >>> p = process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    >>> to_timesteps(p, uniform_schedule(p, 4)).tolist()                   # descending, diffusers' convention
    [999, 749, 500, 250, 0]
    """
    process = check_process(process)
    ts, merge = _check_levels(ts, process), check_bool(merge, "merge")
    if process.n_timesteps < 2:
        raise ValueError("`process` must come from `process_from_alphas_cumprod` (a discrete-time model)")
    return _table_timesteps(ts, process.n_timesteps, merge, "steps, or merge=True")


def _table_timesteps(ts, N, merge, fewer):
    k = np.rint(ts * (N - 1)).astype(int)
    if np.any(np.diff(k) <= 0):
        if not merge:
            raise ValueError(f"two schedule times round to the same timestep of the model's {N}-entry table: use "
                             f"fewer {fewer}")
        k = np.unique(k)
        warnings.warn(f"levels closer than the model's table merged: {len(k)} of {len(ts)} levels remain",
                      RuntimeWarning, stacklevel=3)
    return k[::-1].copy()


def to_sigmas(process, ts, *, dtype=np.float64):
    """The call levels ``ts`` as k-diffusion's ``sigmas``: ``nu`` descending, then 0.

    ``n`` levels give ``n + 1`` values, the shape of ``get_sigmas_karras(n, ...)``; k-diffusion's
    ``sample_euler``, ``sample_dpmpp_2m`` and ``sample_euler_ancestral`` call the model ``n`` times on
    them, ``sample_heun`` ``2n - 1`` (its last step, to 0, is Euler); ``sampler.sample(..., denoise=True)``
    is the same sampler on ``ts``. ``dtype=np.float32`` for a float32 model (float64 sigmas turn float32
    samples into float64 after one step). :meth:`ScheduleMap.sigmas` takes the number of levels.

    >>> to_sigmas(ve(), [0.0, 1.0]).round(9).tolist()       # 2 levels: 2 Euler calls, the last to 0
    [80.0, 0.002, 0.0]
    """
    process = check_process(process)
    return np.append(process.nsr(_check_levels(ts, process))[::-1], 0.0).astype(_check_dtype(dtype))


# -- Schedules for n model calls: the consumers' own defaults, and exports they use verbatim --
# A schedule for n model calls is ``ts``: n increasing times in [t_min, t_max], the levels at which
# the model is called (the highest first when sampling), then the sampler's own final step to
# nu = 0, the denoised output. Euler/DDIM, DPM-Solver++(2M) and the ancestral step make n calls on
# n levels; k-diffusion's Heun 2n - 1. Each consumer below gets exactly these levels and that zero.

def _check_levels(ts, process):
    """Call levels: at least one finite, strictly increasing time in ``[t_min, t_max]`` (the ends are free)."""
    return check_schedule(ts, process, endpoints=False, min_len=1)


def _is_flow(process):
    return process.name.startswith("flow_matching")


def _check_table(process, what):
    if process.n_timesteps < 2:
        raise ValueError(f"`process` must come from `process_from_alphas_cumprod` (a discrete-time model) for "
                         f"{what}, got {process.name!r}")
    return process.n_timesteps


def snap_to_table(process, ts, *, merge=False):
    """The call levels moved to the nearest points ``t = k / (N - 1)`` of a discrete-time model's table.

    For a model that embeds its timestep by lookup (an integer index): evaluate and compare the schedule
    it will actually use. Two levels that snap to one point are an error, or with ``merge=True`` one
    level with a ``RuntimeWarning`` saying how many remain. Increasing, like ``ts``;
    ``to_timesteps(process, snap_to_table(process, ts))`` is the same integers.

    >>> table = process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    >>> (snap_to_table(table, [0.1, 0.5004, 1.0]) * 999).round(9).tolist()
    [100.0, 500.0, 999.0]
    """
    process = check_process(process)
    N = _check_table(process, "snap_to_table")
    k = _table_timesteps(_check_levels(ts, process), N, check_bool(merge, "merge"), "levels, or merge=True")
    return k[::-1] / (N - 1)


def _karras(nu_min, nu_max, n, rho=7.0):
    """k-diffusion's ``get_sigmas_karras`` without its 0, increasing: ``(a + u (b - a))^rho``, ``a, b`` the
    ``1/rho`` powers of the ends, ``u`` uniform on [0, 1]."""
    a, b = nu_min ** (1.0 / rho), nu_max ** (1.0 / rho)
    return (a + np.linspace(0.0, 1.0, n) * (b - a)) ** rho


def _levels_from_nsr(process, nu):
    """Times of increasing ``nu`` with the range's ends pinned exactly (a power or an exponential of the ends
    is off by rounding)."""
    nu_min, nu_max = nsr_range(process)
    return time_from_nsr(process, np.clip(nu, nu_min, nu_max))


def _table_defaults(process, n, steps_offset):
    """diffusers' spacings of ``n`` timesteps, increasing, on the model's own table (docstring of
    :func:`consumer_schedules`); ``steps_offset`` enters ``leading`` only, as in diffusers."""
    N = process.n_timesteps
    k = {"linspace": np.linspace(0, N - 1, n + 1).round()[1:],             # DPMSolverMultistepScheduler
         "leading": np.arange(n) * (N // n) + steps_offset,                 # DDIMScheduler, EulerDiscrete
         "leading_dpm": np.arange(1, n + 1) * (N // (n + 1)) + steps_offset,  # DPMSolverMultistepScheduler
         "trailing": (np.arange(N, 0, -N / n).round() - 1)[::-1]}           # all three
    for name, steps in k.items():
        if len(steps) != n or steps[0] < 0 or steps[-1] > N - 1 or np.any(np.diff(steps) <= 0):
            raise ValueError(f"diffusers' {name!r} spacing gives {len(steps)} timesteps from {steps[0]:g} to "
                             f"{steps[-1]:g} for `n` = {n} on a table of {N} (`steps_offset` = {steps_offset}): "
                             "not n distinct timesteps of the table")
    out = {name: steps / (N - 1) for name, steps in k.items()}
    nu_table = process.nsr(np.arange(N) / (N - 1))                          # EulerDiscrete's linspace: float
    out["linspace_to_0"] = _levels_from_nsr(process, np.interp(np.linspace(0, N - 1, n), np.arange(N), nu_table))
    return out                                                              # timesteps, nu linear between


def _flow_default(process, n, shift, num_train_timesteps=1000):
    """FlowMatchEulerDiscreteScheduler's ``set_timesteps(n)``: ``n`` flow times uniform from 1 to its
    ``sigma_min`` (the shifted ``1/N``), each shifted once more; clipped into the process range."""
    shifted = lambda u: shift * u / (1.0 + (shift - 1.0) * u)
    t = shifted(np.linspace(shifted(1.0 / num_train_timesteps), 1.0, n))
    ts = np.clip(t, process.t_min, process.t_max)
    if np.any(np.diff(ts) <= 0):
        raise ValueError(f"`n` = {n} flow times with `shift` = {shift:g} from {t[0]:.6g} to 1 do not fit the "
                         f"process range [{process.t_min:.6g}, {process.t_max:.6g}] as distinct levels: use "
                         "flow_matching(t_min, t_max) nearer 0 and 1")
    return ts


def consumer_schedules(process, n, *, shift=None, steps_offset=0):
    """The schedules a user already has for ``n`` model calls, as call levels ``ts`` (increasing).

    What applies to the process:

    * a discrete-time model (:func:`process_from_alphas_cumprod`, ``N`` timesteps), diffusers' spacings,
      as timesteps ``k`` at ``t = k / (N - 1)``: ``"linspace"`` (``DPMSolverMultistepScheduler``'s
      default, ``round(linspace(0, N - 1, n + 1))`` without its 0, with ``lambda_min_clipped`` at its
      default), ``"leading"`` (``DDIMScheduler``'s
      default, ``arange(n) (N // n) + steps_offset``; Stable Diffusion's configs set ``steps_offset=1``),
      ``"leading_dpm"`` (``DPMSolverMultistepScheduler``'s ``"leading"``, ``arange(1, n + 1) (N // (n + 1))
      + steps_offset``: its top call is below timestep ``N - 1``),
      ``"trailing"`` (``round(arange(N, 0, -N / n)) - 1``: 999, 899, ..., 99 for ``n = 10``),
      ``"linspace_to_0"`` (``EulerDiscreteScheduler``'s default, ``linspace(0, N - 1, n)`` with ``nu``
      linear between the table's points: its last call is at timestep 0) and ``"karras"``
      (``use_karras_sigmas=True``: the table's ``nu`` range, the model called at the rounded timestep);
    * a :func:`flow_matching` process, ``"shifted"``: ``FlowMatchEulerDiscreteScheduler(shift=shift)``'s
      ``set_timesteps(n)`` (``shift`` is required; 3.0 in Stable Diffusion 3), whose top level ``t = 1``
      (pure noise) is ``t_max`` here and exported as 1 again (:func:`to_diffusers`);
    * any other process, k-diffusion's ``"karras"`` (``get_sigmas_karras(n, nu_min, nu_max, rho=7)``) and
      ``"exponential"`` (``get_sigmas_exponential``, uniform in ``log nu``) on the process's ``nu`` range.

    Each is exactly the consumer's own (tested against it where installed, and against its formula); a
    level outside ``[t_min, t_max]`` is clipped into it. Returns a dict name -> ``ts``, ``n`` levels each.

    >>> sorted(consumer_schedules(ve(), 10))
    ['exponential', 'karras']
    >>> table = process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    >>> (consumer_schedules(table, 4)["trailing"] * 999).round(9).tolist()
    [249.0, 499.0, 749.0, 999.0]
    """
    process, n = check_process(process), check_int(n, "n", 1)
    steps_offset = check_int(steps_offset, "steps_offset", 0)
    if _is_flow(process):
        if shift is None:
            raise ValueError("`shift` is needed for a flow_matching process: FlowMatchEulerDiscreteScheduler's "
                             "own (scheduler.shift; 1.0 by default, 3.0 in Stable Diffusion 3)")
        return {"shifted": _flow_default(process, n, check_positive(shift, "shift"))}
    if shift is not None:
        raise ValueError(f"`shift` applies to a flow_matching process only, not to {process.name!r}")
    nu_min, nu_max = nsr_range(process)
    karras = _levels_from_nsr(process, _karras(nu_min, nu_max, n))
    if process.n_timesteps >= 2:
        return {**_table_defaults(process, n, steps_offset), "karras": karras}
    return {"karras": karras,
            "exponential": _levels_from_nsr(process, np.exp(np.linspace(np.log(nu_min), np.log(nu_max), n)))}


def _flow_times(process, ts):
    """Flow times of the call levels, descending; a top level at ``t_max`` is 1 (pure noise, where flow
    pipelines start: ``nu(t_max)`` is the process's stand-in for an infinite ``nu``)."""
    if not _is_flow(process):
        raise ValueError(f"`process` must be a flow_matching process for flow times, got {process.name!r}")
    t = ts[::-1].copy()
    if t[0] == process.t_max:
        t[0] = 1.0
    return t


# Settings of a diffusers scheduler under which it would not use the exported levels as given.
_DIFFUSERS_REFUSED = {
    "DPMSolverMultistepScheduler": {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                                    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                                    "final_sigmas_type": "zero"},
    "EulerDiscreteScheduler": {},
    "FlowMatchEulerDiscreteScheduler": {"use_dynamic_shifting": False, "shift_terminal": None,
                                        "use_karras_sigmas": False, "use_exponential_sigmas": False,
                                        "use_beta_sigmas": False, "invert_sigmas": False},
}


def _diffusers_scheduler(scheduler, process):
    """``(name, shift)`` of a scheduler given by its class name or as an instance (duck-typed: this module
    never imports diffusers); an instance's settings and table are checked against the export, and its
    ``shift`` read (a FlowMatch scheduler's; else None)."""
    if isinstance(scheduler, str):
        name, config, shift = scheduler, {}, None
    else:
        name, config = type(scheduler).__name__, dict(getattr(scheduler, "config", None) or {})
        shift = getattr(scheduler, "shift", None) if name == "FlowMatchEulerDiscreteScheduler" else None
    if name == "DDIMScheduler":
        raise ValueError("`scheduler` DDIMScheduler takes no custom timesteps: DPMSolverMultistepScheduler("
                         "solver_order=1) with to_diffusers(process, ts, 'DPMSolverMultistepScheduler') is DDIM "
                         "(eta = 0) on the same timesteps (tested), as is EulerDiscreteScheduler with its sigmas")
    if name not in _DIFFUSERS_REFUSED:
        raise ValueError(f"`scheduler` must be one of {sorted(_DIFFUSERS_REFUSED)} (or an instance), got {name!r}")
    for key, wanted in _DIFFUSERS_REFUSED[name].items():
        if key in config and config[key] != wanted and not (wanted is None and not config[key]):
            hint = (" (with dynamic shifting the shift is exp(mu), exponential type: build the scheduler with "
                    "use_dynamic_shifting=False, shift=exp(mu))" if key == "use_dynamic_shifting" else "")
            raise ValueError(f"`scheduler` {name} has {key}={config[key]!r}: it would not use the exported levels "
                             f"as given; set {key}={wanted!r}{hint}")
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is not None and process.n_timesteps >= 2 and not isinstance(scheduler, str):
        theirs = process_from_alphas_cumprod(np.asarray(table, dtype=float)).name
        if theirs != process.name:
            raise ValueError(f"`scheduler` {name} has the table {theirs}, not the process's {process.name}")
    return name, shift


def to_diffusers(process, ts, scheduler, *, shift=None):
    """The keyword arguments for ``scheduler.set_timesteps(**kw)`` that make a diffusers scheduler call the
    model at exactly the levels ``ts`` and then step to 0: ``n`` levels, ``n`` model calls.

    ``scheduler``: a class name or an instance (whose settings and table are then checked).

    * ``"DPMSolverMultistepScheduler"``: ``{"timesteps": n integers}``, descending, ``to_timesteps``'s
      (levels between the table's points are rounded: :func:`snap_to_table` first to evaluate the schedule
      used); it appends ``sigma = 0`` itself (``final_sigmas_type="zero"``). With ``solver_order=1`` it is
      DDIM (``eta = 0``): ``DDIMScheduler`` takes no custom timesteps, so that is refused, saying this.
    * ``"EulerDiscreteScheduler"``: ``{"sigmas": n + 1 values}``, ``nu`` descending and the final 0, which
      it does not append; it passes the model the timesteps interpolated in ``log nu``, floats between the
      table's points: a model that looks its timestep up needs :func:`snap_to_table` first.
    * ``"FlowMatchEulerDiscreteScheduler"``: ``{"sigmas": n flow times}`` (:func:`flow_matching`), descending,
      a top level at ``t_max`` as 1; it appends the 0. It shifts custom sigmas by ``shift t / (1 + (shift -
      1) t)``, so they are pre-unshifted, ``t / (shift - (shift - 1) t)``: ``shift`` is the scheduler's own
      (read from an instance; required with a name). ``use_dynamic_shifting=True`` is refused: its shift is
      ``exp(mu)``, so build the scheduler with ``shift=exp(mu)``.

    Every diffusers scheduler above takes a table process's model calls at its timesteps; the processes must
    match (a table process for the first two, a flow_matching process for the third).

    >>> table = process_from_alphas_cumprod(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    >>> to_diffusers(table, [99 / 999, 0.5, 1.0], "DPMSolverMultistepScheduler")
    {'timesteps': [999, 500, 99]}
    >>> kw = to_diffusers(flow_matching(), [0.25, 0.5], "FlowMatchEulerDiscreteScheduler", shift=3.0)
    >>> [round(t, 6) for t in kw["sigmas"]]                   # shifted by 3, they are 0.5 and 0.25
    [0.25, 0.1]
    """
    process = check_process(process)
    ts = _check_levels(ts, process)
    name, own_shift = _diffusers_scheduler(scheduler, process)
    if name != "FlowMatchEulerDiscreteScheduler":
        if shift is not None:
            raise ValueError(f"`shift` applies to FlowMatchEulerDiscreteScheduler only, not to {name}")
        _check_table(process, name)
        if name == "DPMSolverMultistepScheduler":
            return {"timesteps": to_timesteps(process, ts).tolist()}
        return {"sigmas": to_sigmas(process, ts).tolist()}
    if shift is None and own_shift is None:
        raise ValueError("`shift` is needed with the name FlowMatchEulerDiscreteScheduler: the scheduler's own "
                         "(scheduler.shift; 1.0 by default, 3.0 in Stable Diffusion 3), or pass the scheduler")
    if shift is not None and own_shift is not None and not np.isclose(check_positive(shift, "shift"), own_shift):
        raise ValueError(f"`shift` = {shift} differs from the scheduler's own shift {own_shift}")
    s = check_positive(own_shift if shift is None else shift, "shift")
    t = _flow_times(process, ts)
    return {"sigmas": (t / (s - (s - 1.0) * t)).tolist()}


def to_comfyui(process, ts):
    """ComfyUI's ``ManualSigmas`` string: the ``sigmas`` comma-separated, descending, the final 0 included.

    A flow_matching process gives flow times (ComfyUI's sigma for flow models; a top level at ``t_max`` as
    1), any other ``nu`` (k-diffusion's sigmas, :func:`to_sigmas`). Written without exponents, in the
    shortest digits that read back to the same float64: ManualSigmas reads numbers with the pattern
    ``[-+]?(?:\\d*\\.*\\d+)``, which would read ``1e-05`` as 1 and -5. Its discrete (ε- and v-) models look
    the timestep up at the table's point nearest in ``log sigma``: :func:`snap_to_table` first to evaluate
    the schedule used.

    >>> to_comfyui(flow_matching(), [0.25, flow_matching().t_max])       # 2 levels: t = 1 and 0.25, then 0
    '1, 0.25, 0'
    """
    process = check_process(process)
    ts = _check_levels(ts, process)
    values = np.append(_flow_times(process, ts), 0.0) if _is_flow(process) else to_sigmas(process, ts)
    return ", ".join(np.format_float_positional(v, trim="-") for v in values)


class _Guest:
    """A guest framework's model as a score: called through :func:`call_model` (copies in; tensors converted;
    bool, integer and complex outputs refused; float16 warned of once). Module level, so it pickles whenever
    the model does; autograd's traced values pass through to the model untouched."""

    def __init__(self, model, name):
        self.model, self.name, self.low_precision = model, name, None
        self.process = getattr(model, "process", None)

    def __call__(self, x, t):
        if isinstance(x, Box) or isinstance(t, Box):             # autograd is tracing: the model as it is
            return self.model(x, t)
        return call_model(self.model, self.name, x, t, self, x, t)


def guest_score(score, name="score", *, batch_size=None, process=None):
    """``scoreopt.checked_score`` around ``score`` hardened for a guest framework's model (:class:`_Guest`):
    what this part's functions call a user's score through. Idempotent.

    >>> score = guest_score(lambda x, t: np.float32(-1.0) * x, process=ve())
    >>> score(np.ones((2, 1)), 0.5).dtype, score.calls
    (dtype('float64'), 1)
    """
    if isinstance(score, _CheckedScore) and isinstance(score.score, (_Guest, _Adapter)) and batch_size is None:
        return score
    raw = score.score if isinstance(score, _CheckedScore) else check_callable(score, name, f"{name}(x, t)")
    if not isinstance(raw, (_Guest, _Adapter)):
        raw = _Guest(raw, name)
    return checked_score(raw, name, batch_size=batch_size, process=process)


def call_model(model, name, x, t, owner, *args):
    """``model(*args)`` with every array argument copied, its output owned by :func:`own_output` (shape
    that of ``x``); a raise is re-raised as :class:`ScoreEvaluationError` naming ``name`` and ``t``."""
    try:
        value = model(*(a.copy() if isinstance(a, np.ndarray) else a for a in args))
    except Exception as err:
        if getattr(err, "checked_output", False):        # an adapter's own check of its model: as it is
            raise
        raise ScoreEvaluationError(f"`{name}` raised {type(err).__name__} at {_when(t)}: {err}"
                                   + _rowwise_hint(t)) from err
    return own_output(value, x.shape, t, name, owner)


def _checked_output(kind, message):
    """An error of a checked output, marked so that an outer model-call wrapper passes it on unchanged."""
    err = kind(message)
    err.checked_output = True
    return err


def own_output(value, shape, t, name, owner=None):
    """A model's output as a new float64 array of ``shape``, finite; else a TypeError/ValueError naming
    ``name`` and the time. Tensor-likes convert through ``__array__``; bool, integer and complex
    outputs are refused; a float dtype below float32's precision is warned of once per ``owner``."""
    said = f"`{name}` returned"
    if not (isinstance(value, np.ndarray) or hasattr(value, "__array__")):       # None, a list, a float
        raise _checked_output(TypeError, f"{said} {type(value).__name__} at {_when(t)}; expected an array of "
                                         f"shape {tuple(shape)}")
    try:
        native = np.asarray(value)
    except Exception as err:
        raise _checked_output(TypeError, f"{said} {type(value).__name__} at {_when(t)}, which does not convert "
                                         f"to an array: {err}") from None
    if native.dtype.kind != "f":
        kind = {"b": "booleans", "c": "complex values", "i": "integers", "u": "integers"}.get(native.dtype.kind,
                                                                                             "non-numbers")
        raise _checked_output(TypeError, f"{said} {kind} ({native.dtype}) at {_when(t)}; a score or model output "
                                         "must be floating point")
    if native.shape != tuple(shape):
        raise _checked_output(ValueError, f"{said} shape {native.shape} at {_when(t)}; expected {tuple(shape)}"
                                          + _rowwise_hint(t))
    array = np.array(native, dtype=float)          # a copy: the model may reuse its buffer
    finite = np.all(np.isfinite(array.reshape(len(array), -1)), axis=1) if array.ndim else np.isfinite(array)
    if not np.all(finite):
        rows = "" if np.ndim(t) == 0 else f" (rows {np.flatnonzero(~finite)[:5].tolist()})"
        where = _when(t if np.ndim(t) == 0 else np.asarray(getval(t))[~finite])
        raise _checked_output(ValueError, f"{said} non-finite values at {where}{rows}")
    if native.dtype.itemsize < 4 and owner is not None and owner.low_precision is None:
        owner.low_precision = native.dtype.name
        warnings.warn(f"`{name}` returns {native.dtype.name}, below float32 precision: costs and schedules "
                      "computed from it are biased (about 9% in Lambda with float16); cast the model's output to "
                      "float32 or float64", RuntimeWarning, stacklevel=4)
    return array


def _rowwise_hint(t):
    return ("; it was given one time per row, an array of shape (n,): a score that takes one float t at a time "
            "can be wrapped with scoreopt.rowwise_score(score)") if np.ndim(t) else ""



class _Adapter:
    """A user's model and the process it was trained on, as a score ``score(x, t)``: a module-level class,
    so it pickles whenever the model does. The model is called through :func:`call_model` (copies in, its
    output checked and owned). ``t`` may be a float or one time per row; the model gets it (or ``nu``) so."""

    def __init__(self, model, process, name):
        self.model, self.process, self.name = check_callable(model, name, f"{name}(x, t)"), check_process(process), name
        self.low_precision = None

    def run(self, x, t, *args):
        return call_model(self.model, self.name, x, t, self, *args)


class _DenoiserScore(_Adapter):
    def __call__(self, x, t):
        s, nu = as_column(self.process.s(t)), self.process.nsr(t)
        y = x / s
        return (self.run(x, t, y, nu) - y) / (s * as_column(nu) ** 2)


class _EpsScore(_Adapter):
    def __call__(self, x, t):
        return -self.run(x, t, x, t) / as_column(self.process.sigma(t))


class _VScore(_Adapter):
    def __call__(self, x, t):
        s, sigma = as_column(self.process.s(t)), as_column(self.process.sigma(t))
        return -(sigma * x + s * self.run(x, t, x, t)) / ((s ** 2 + sigma ** 2) * sigma)


class _FlowScore(_Adapter):
    def __call__(self, x, t):
        p = self.process
        s, sigma = as_column(p.s(t)), as_column(p.sigma(t))
        s_dot, sigma_dot = as_column(elementwise_grad(p.s)(t)), as_column(elementwise_grad(p.sigma)(t))
        return -(s * self.run(x, t, x, t) - s_dot * x) / ((s * sigma_dot - sigma * s_dot) * sigma)


def score_from_denoiser(denoiser, process):
    """Score of a denoiser ``D(y, nu) ~ E[x_0 | y]`` in k-diffusion/EDM convention (``y = x / s``, noise level
    ``nu``): Tweedie's formula ``D = y + nu^2 grad_y log p(y)`` gives ``S(x, t) = (D(x/s, nu) - x/s) / (s nu^2)``.

    >>> exact = lambda y, nu: y * 0.25 / (0.25 + nu ** 2)                  # E[x_0 | y] for N(0, 0.5^2) data
    >>> score = score_from_denoiser(exact, ve())
    >>> bool(np.isclose(score(np.ones((1, 1)), 0.5)[0, 0], -1 / (0.25 + 0.4 ** 2)))
    True
    """
    return _DenoiserScore(denoiser, process, "denoiser")


def score_from_eps(eps_model, process):
    """Score of a noise prediction ``eps(x, t) ~ E[eps | x_t]``: ``S = -eps / sigma``.

    >>> p = vp_linear()
    >>> eps = lambda x, t: x * p.sigma(t) / (p.s(t) ** 2 * 0.25 + p.sigma(t) ** 2)   # E[eps | x_t], N(0, 0.5^2) data
    >>> exact = -1 / (p.s(0.5) ** 2 * 0.25 + p.sigma(0.5) ** 2)
    >>> bool(np.isclose(score_from_eps(eps, p)(np.ones((1, 1)), 0.5)[0, 0], exact))
    True
    """
    return _EpsScore(eps_model, process, "eps_model")


def score_from_v(v_model, process):
    """Score of a v-prediction ``v(x, t) ~ E[s eps - sigma x_0 | x_t]`` (Salimans & Ho 2022):
    ``eps = (sigma x + s v) / (s^2 + sigma^2)`` and ``S = -eps / sigma``.

    >>> p = vp_cosine()
    >>> a = lambda t: p.s(t) ** 2 * 0.25 + p.sigma(t) ** 2                  # Var x_t for N(0, 0.5^2) data
    >>> v = lambda x, t: x * (p.s(t) * p.sigma(t) - p.sigma(t) * p.s(t) * 0.25) / a(t)   # E[s eps - sigma x_0 | x_t]
    >>> bool(np.isclose(score_from_v(v, p)(np.ones((1, 1)), 0.5)[0, 0], -1 / a(0.5)))
    True
    """
    return _VScore(v_model, process, "v_model")


def score_from_flow(flow_model, process):
    """Score of a flow-matching velocity ``u(x, t) ~ E[s' x_0 + sigma' eps | x_t]``: ``eps = (s u - s' x) /
    (s sigma' - sigma s')`` and ``S = -eps / sigma``; under :func:`flow_matching`, ``S = -(x + (1 - t) u) / t``.

    >>> p = flow_matching()
    >>> u = lambda x, t: x * (t - (1 - t) * 0.25) / ((1 - t) ** 2 * 0.25 + t ** 2)   # E[eps - x_0 | x_t], N(0, 0.5^2)
    >>> bool(np.isclose(score_from_flow(u, p)(np.ones((1, 1)), 0.5)[0, 0], -1 / (0.25 * 0.25 + 0.25)))
    True
    """
    return _FlowScore(flow_model, process, "flow_model")


class _RowwiseScore:
    def __init__(self, score):
        self.score = check_callable(score, "score", "score(x, t)")
        self.process = getattr(score, "process", None)

    def __call__(self, x, t):
        if np.ndim(t) == 0:
            return self.score(x, t)
        times, where = np.unique(np.asarray(t, dtype=float), return_inverse=True)
        out = np.empty(x.shape, dtype=float)
        for k, tk in enumerate(times):
            out[where == k] = self.score(x[where == k], float(tk))
        return out


def rowwise_score(score):
    """A score that takes one float ``t`` at a time, made to take one time per row: ``t`` an array (n,) calls
    ``score`` once per distinct time on its rows. Picklable when ``score`` is.

    >>> one_time = lambda x, t: -x / (1.0 + float(t) ** 2)             # float(t) fails on an array
    >>> rowwise_score(one_time)(np.ones((3, 1)), np.array([0.0, 1.0, 0.0])).ravel().tolist()
    [-1.0, -0.5, -1.0]
    """
    return _RowwiseScore(score)


def _check_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"`dtype` must be a NumPy floating dtype such as np.float32, got {dtype!r}") from None
    if dtype.kind != "f":
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
    return dtype


# -- Files: written atomically; the schedule-map file (JSON) ---------------------

def write_atomically(path, data):
    """Write ``path`` through a temporary file in the same folder: ``data`` (``str``, ``bytes``, or a function
    ``data(f)`` writing to the open binary file) is written, flushed, renamed over ``path``, and the folder
    flushed.

    Only a regular file is replaced, or a new one created: a folder, a device (``/dev/null``), a named pipe,
    a socket or a descriptor of this process (``/dev/stdout``, ``/proc/self/fd/1``) at ``path`` is a
    ``ValueError`` naming it, and a read-only file (no write bit, as ``cp`` refuses it, also for root) a
    ``PermissionError``; nothing is written. A symbolic link is followed and the rules apply to its target,
    which is replaced. A replaced file keeps its permission bits, and the temporary file has them from its
    creation; a new file is created with mode 0666, so the process's umask applies (never changed).

    After any interruption, SIGKILL included, ``path`` is the previous file or the new one, never a mixture.
    The temporary file is ``.<name>.<pid>.<8 hex digits>.tmp``; one left by a killed writer is removed by the
    next write of the same path (only a regular file of this exact pattern whose process is gone, so
    concurrent writers and a user's own files are safe). An ``OSError`` (a full disk) names the path and says
    the previous file is unchanged.
    """
    if isinstance(data, (str, bytes)):
        payload = data.encode() if isinstance(data, str) else data
        data = lambda f: f.write(payload)
    path = _save_target(path)
    mode = _replaceable_mode(path)
    folder, base = os.path.split(path)
    _remove_stale_temporaries(folder, base)
    try:
        fd, tmp = _create_temporary(folder, base, 0o666 if mode is None else mode)
    except OSError as err:
        raise OSError(err.errno, f"cannot write `{path}`: {err.strerror}; the previous file is unchanged") from err
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)          # the target's bits, whatever the umask
            data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write `{path}`: {err.strerror}; the previous file is unchanged") from err
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _save_target(path):
    """The real path a save replaces: symbolic links followed; a link through ``/proc`` (``/dev/stdout``,
    ``/dev/fd/1``: a descriptor of this process, whose target may be a log that a redirection opened) refused."""
    link = os.path.abspath(os.fspath(path))
    for _ in range(40):
        if not os.path.islink(link):
            break
        if _is_proc(os.path.realpath(os.path.dirname(link))):
            raise ValueError(f"`{path}` is a descriptor of this process (a link through /proc), not a file: a save "
                             "replaces only a regular file or creates one; nothing was written")
        link = os.path.join(os.path.dirname(link), os.readlink(link))
    real = os.path.realpath(link)
    if _is_proc(os.path.dirname(real)):
        raise ValueError(f"`{path}` lies in /proc, not on a file system that keeps files; nothing was written")
    return real


def _is_proc(folder):
    return folder == "/proc" or folder.startswith("/proc/")


def _file_kind(mode):
    """What a non-regular file is, in words."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _replaceable_mode(path):
    """The permission bits of the regular file at ``path`` (None if there is none); anything else there, or a
    read-only file, is refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"`{path}` is {_file_kind(st.st_mode)}: a save replaces only a regular file or creates "
                         "one; nothing was written")
    if not st.st_mode & 0o222 or not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, f"`{path}` is read-only (mode {stat.S_IMODE(st.st_mode):04o}): a save "
                                            "does not replace it; make it writable or remove it first")
    return stat.S_IMODE(st.st_mode)


def _create_temporary(folder, base, mode):
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside `{base}` in `{folder}`")


MAX_PID = 2 ** 31 - 1        # the largest process id (pid_t); a larger number in a name is not a writer's


def _remove_stale_temporaries(folder, base):
    """Remove the temporary files of killed writers: regular files, this user's, named exactly
    ``.<base>.<pid>.<8 hex digits>.tmp`` with a ``pid`` (at most 10 digits) whose process is gone."""
    pattern = re.compile(re.escape(f".{base}.") + r"([1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or int(match.group(1)) > MAX_PID or _process_alive(int(match.group(1))):
            continue
        try:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode) and st.st_uid == getattr(os, "geteuid", lambda: st.st_uid)():
                os.unlink(os.path.join(folder, name))
        except OSError:
            pass


MAX_FILE_BYTES = 2 ** 30     # the loaders refuse a larger file (a 1,000-level map is about 0.1 MB)


def read_regular_file(path, limit=None):
    """The bytes of the regular file at ``path``: a folder, a device (``/dev/zero``), a named pipe (opened
    without blocking, so it cannot hang) or a file over ``limit`` bytes (``MAX_FILE_BYTES``) is a
    ``ValueError`` naming it; a missing or unreadable one an ``OSError``."""
    limit = check_int(MAX_FILE_BYTES if limit is None else limit, "MAX_FILE_BYTES", 1)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"`{path}` is {_file_kind(st.st_mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            raise ValueError(f"`{path}` is larger than {limit:,} bytes (MAX_FILE_BYTES)")
    return data


SCHEDULE_MAP_FORMAT = "scoreopt.ScheduleMap/1"
_ORDERS = (1, 2, 3, 4, 6, 8)


def load_schedule_map(path):
    """Read a :class:`ScheduleMap` written by :meth:`ScheduleMap.save`, checking every field.

    A truncated, hand-edited or foreign file raises ``ValueError`` naming the path, the field and
    the rule it breaks: not JSON (or nested too deeply), the wrong format, a missing field or one
    of the wrong type; the grid (finite, increasing, inside the recorded range; ``nu`` finite,
    positive, increasing, one per time); ``delta``, ``Lambda`` and its groups (finite,
    non-negative, ``Lambda`` from 0, not decreasing, not all zero); ``length`` (the end of
    ``Lambda``); the error bars; ``order`` (1, 2, 3, 4, 6 or 8); the counts.

    >>> import os, tempfile
    >>> smap = estimate_schedule_map(lambda x, t: -x / (0.25 + ve().sigma(t) ** 2), ve(),
    ...                              0.5 * np.random.default_rng(0).standard_normal((400, 1)), 0, n_grid=50)
    >>> path = os.path.join(tempfile.mkdtemp(), "map.json")
    >>> smap.save(path)
    >>> bool(np.array_equal(load_schedule_map(path).schedule(10), smap.schedule(10)))
    True
    """
    try:
        data = json.loads(read_regular_file(path).decode("utf-8"))
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
    for k in ("delta", "delta_stderr", "Lambda"):
        check_costs(arrays[k], len(ts), name=k)
    Lambda, groups = arrays["Lambda"], arrays["Lambda_groups"]
    if Lambda[0] != 0 or np.any(np.diff(Lambda) < 0) or Lambda[-1] <= 0:
        raise ValueError("`Lambda` must start at 0, not decrease, and not be all zero")
    if groups.shape[1:] != ts.shape or len(groups) < 2 or np.any(groups < 0) or np.any(np.diff(groups, axis=1) < 0):
        raise ValueError(f"`Lambda_groups` must be non-negative and non-decreasing with shape (groups >= 2, {len(ts)})")
    length = _json_scalar(data["length"], "length")
    if not np.isclose(length, Lambda[-1], rtol=1e-12, atol=0):
        raise ValueError("`length` is not the end of `Lambda`")
    stderr, grid_error = _json_scalar(data["length_stderr"], "length_stderr"), _json_scalar(
        data.get("grid_error", 0.0), "grid_error")
    order, count, metadata = data["order"], data["n_evaluations"], data["metadata"]
    if isinstance(order, bool) or order not in _ORDERS:
        raise ValueError(f"`order` must be one of {_ORDERS}, got {_short(order)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"`n_evaluations` must be a non-negative integer, got {_short(count)}")
    if not isinstance(metadata, dict):
        raise ValueError("`metadata` must be an object")
    _check_metadata(metadata, ts)
    return ScheduleMap(ts, arrays["delta"], arrays["delta_stderr"], Lambda, length, stderr, groups, int(order), count,
                       metadata, grid_error)


def _check_metadata(metadata, ts):
    """The metadata the map's methods use: ``nu`` (one per time, finite, positive, increasing), the recorded
    range (``ts`` inside it), the process name (a string)."""
    if "nu" in metadata:
        nu = _json_numbers(metadata["nu"], "metadata.nu", ndim=1)
        if nu.shape != ts.shape or np.any(nu <= 0) or np.any(np.diff(nu) <= 0):
            raise ValueError(f"`metadata.nu` must be {len(ts)} finite, positive, increasing noise levels")
    if "t_min" in metadata or "t_max" in metadata:
        lo = _json_scalar(metadata.get("t_min"), "metadata.t_min", None)
        hi = _json_scalar(metadata.get("t_max"), "metadata.t_max", None)
        slack = 1e-6 * (hi - lo)            # bounds saved from float32 values
        if not lo < hi or ts[0] < lo - slack or ts[-1] > hi + slack:
            raise ValueError(f"`ts` must lie inside the recorded range [`metadata.t_min`, `metadata.t_max`] = "
                             f"[{lo}, {hi}]")
    if "process" in metadata and not isinstance(metadata["process"], str):
        raise ValueError("`metadata.process` must be a string")
    if not isinstance(metadata.get("process_digest", ""), str):
        raise ValueError("`metadata.process_digest` must be a string")
    N, name = metadata.get("n_timesteps", 0), metadata.get("process", "")
    table = re.fullmatch(r"alphas_cumprod\(N=([0-9]+)(, sha256 [0-9a-f]+)?\)", name)
    if "n_timesteps" in metadata and (isinstance(N, bool) or not isinstance(N, int) or N < 0 or (
            N >= 2) != bool(table) or (table and int(table.group(1)) != N)):
        raise ValueError(f"`metadata.n_timesteps` must be the length of the table of an alphas_cumprod process "
                         f"(0 for another process), got {N!r} for the process {name!r}")
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise ValueError(f"`metadata` is nested more than {MAX_METADATA_DEPTH} levels deep")


MAX_METADATA_DEPTH = 32      # a map's metadata nested deeper is refused (it could be loaded but not saved)


def _depth(value):
    """How deeply lists and dicts nest in ``value`` (iteratively: a deep value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(value, (list, dict)) and depth <= MAX_METADATA_DEPTH:
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _json_numbers(value, name, ndim):
    """A (nested) list of finite numbers (not booleans or strings) of ``ndim`` dimensions, as a float array."""
    out = np.array(value, dtype=object) if isinstance(value, list) else np.array(None, dtype=object)
    if out.ndim != ndim:
        raise TypeError(f"`{name}` must be a {ndim}-D list of numbers (rows of one length), found "
                        f"{type(value).__name__}")
    bad = [v for v in out.flat if type(v) not in (int, float)]        # booleans and strings are not numbers
    if bad:
        raise TypeError(f"`{name}` must hold numbers, found {type(bad[0]).__name__}")
    try:
        out = out.astype(float)
    except OverflowError:                     # an integer beyond float64 (10**400)
        out = np.full(out.shape, np.inf)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"`{name}` must be a finite {ndim}-D array")
    return out


def _json_scalar(value, name, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(_float_or_inf(value)):
        raise ValueError(f"`{name}` must be a finite number, got {_short(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return float(value)


def _float_or_inf(value):
    try:
        return float(value)
    except OverflowError:                     # an integer beyond float64
        return math.inf


def _short(value):
    """``repr(value)`` cut to 60 characters (a hand-edited field may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value, name):
    """``value`` as plain JSON (NumPy scalars and arrays converted); a non-finite number or an unknown type is
    an error naming the field."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v, name) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"cannot save field `{name}`: it holds {value}, not a finite number")
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    raise TypeError(f"cannot save field `{name}`: {type(value).__name__} is not a number, string, list or dict")


# -- Progress and the command line: python -m scoreopt MAP.json -n N -------------

def progress_printer(label="", lines=10, file=None):
    """A callback ``callback(done, total, info)`` that prints ``label done/total`` about ``lines`` times a run,
    with what ``info`` holds of ``loss``, ``Lambda``, ``evaluations`` and ``elapsed``.

    >>> import io
    >>> out = io.StringIO()
    >>> callback = progress_printer("map", lines=2, file=out)
    >>> callback(1, 2, {"elapsed": 0.5}), callback(2, 2, {"elapsed": 1.0})
    (None, None)
    >>> print(out.getvalue(), end="")
    map 1/2  0.5 s
    map 2/2  1.0 s
    """
    lines = check_int(lines, "lines", 1)

    def callback(done, total, info):
        if done % max(1, total // lines) and done != total:
            return
        parts = [f"{label} {done}/{total}".strip()]
        for key, fmt in (("loss", "loss {:.4f}"), ("Lambda", "Lambda {:.3f}"), ("evaluations", "{:,} evaluations")):
            if info.get(key) is not None:
                parts.append(fmt.format(info[key]))
        if "elapsed" in info:
            parts.append(f"{info['elapsed']:.1f} s")
        print("  ".join(parts), file=file or sys.stdout, flush=True)
    return callback


def main(argv=None):
    """``python -m scoreopt MAP.json -n 20 [--convention ...] [--json]``: inspect a saved map and print its
    schedule for ``n`` model calls in a sampler's convention. Every failure is one line on stderr and a
    non-zero exit status (2 for a bad map or argument, 1 when the output cannot be written)."""
    parser = argparse.ArgumentParser(prog="python -m scoreopt", description=(
        "Inspect a schedule map saved by ScheduleMap.save and print its schedule in a sampler's convention."))
    parser.add_argument("path", help="a schedule map (JSON) written by ScheduleMap.save")
    parser.add_argument("-n", "--levels", type=int, default=None,
                        help="number of noise levels = model calls with an Euler sampler (k-diffusion's n)")
    parser.add_argument("--convention", default="k-diffusion",
                        choices=["k-diffusion", "diffusers-sigmas", "diffusers-timesteps", "flow", "times"],
                        help="k-diffusion / diffusers-sigmas: n descending nu then 0; diffusers-timesteps: n integer "
                             "timesteps of an alphas_cumprod map; flow: n flow-matching times from 1; times: the "
                             "map's own n - 1 step schedule in t")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        smap = load_schedule_map(args.path)
        values = None if args.levels is None else _export(smap, args.convention, args.levels)
    except (ValueError, TypeError, MemoryError) as err:
        print(f"error: {_printable(err)}" if not isinstance(err, MemoryError) else
              f"error: -n {args.levels} levels do not fit in memory", file=sys.stderr)
        return 2
    try:
        print(_describe(smap, args, values), flush=True)
    except BrokenPipeError:                       # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:                        # a full disk behind a redirection
        print(f"error: cannot write the output: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def _describe(smap, args, values):
    info = {"path": args.path, "process": (smap.metadata or {}).get("process"), "length": smap.length,
            "length_stderr": smap.length_stderr, "grid_error": smap.grid_error, "n_grid": len(smap.ts),
            "n_evaluations": smap.n_evaluations}
    if values is not None:
        info.update(convention=args.convention, n=args.levels, values=values.tolist())
    if args.json:
        return json.dumps(info)
    text = (f"{_printable(args.path)}: process {_printable(info['process'])}, Lambda = {smap.length:.4f} +- "
            f"{smap.length_stderr:.4f} "
            f"(grid error {smap.grid_error:.2g}), {len(smap.ts)} levels, {smap.n_evaluations} evaluations")
    return text if values is None else text + f"\n{args.convention}, n = {args.levels}:\n" + " ".join(
        f"{v:.6g}" for v in values)


def _printable(text):
    """``text`` (from a file or the command line) with control characters, which a terminal would obey, and
    bytes that are not UTF-8 escaped (``\\x1b``, ``\\xff``)."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


MAX_LEVELS = 10 ** 8     # the command line's largest -n (0.8 GB of float64 levels)


def _export(smap, convention, n):
    """The command line's export of a loaded map (no process object: its metadata says which it was)."""
    n = check_int(n, "-n", 2)
    if n > MAX_LEVELS:
        raise ValueError(f"`-n` {n} levels do not fit in memory (at most {MAX_LEVELS:,})")
    if convention in ("k-diffusion", "diffusers-sigmas"):
        return smap.sigmas(n)
    if convention == "times":
        return smap.schedule(n - 1)
    name = (smap.metadata or {}).get("process", "")
    if convention == "flow":
        if not name.startswith("flow_matching"):
            raise ValueError(f"`--convention flow` needs a map of a flow_matching process; this one is {name!r}")
        t = smap.schedule(n - 1)[::-1].copy()
        t[0] = 1.0
        return t
    N = (smap.metadata or {}).get("n_timesteps", 0)
    if not (isinstance(N, int) and N >= 2):
        raise ValueError(f"`--convention diffusers-timesteps` needs a map of an alphas_cumprod process; this one is "
                         f"{name!r}")
    return _table_timesteps(smap.schedule(n - 1), N, False, "levels -n")


if __name__ == "__main__":
    sys.exit(main())
