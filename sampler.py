"""Predictor-corrector sampler for any schedule, and the evaluation metrics (SPEC 7, 10).

``sample(score, process, ts, x_T, rng, ...)`` walks any valid schedule ``ts`` from
``ts[-1]`` down to ``ts[0]``: at each pair ``t_cur > t_next`` a predictor step from
``t_cur`` to ``t_next``, then ``corrector_steps`` unadjusted Langevin steps at
``t_next``. Every single step is a small function of its own. Noise is drawn only
as ``rng.standard_normal(x.shape)``.
"""

from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, value_and_grad
from autograd.tracer import getval
from scipy.integrate import trapezoid
from scipy.optimize import minimize
from scipy.stats import gaussian_kde

from scoreopt import (baseline_schedules, _as_float_array, _check_finite, _check_int, _eval_score, _check_steps, _check_positive, _check_process, _noised,
                      as_rng, check_data, check_schedule, ddim_coefficients)

__all__ = ["sample", "prior_sample", "euler_step", "heun_step", "ancestral_step",
           "euler_maruyama_step", "identity_step", "langevin_step", "tweedie_denoise", "PREDICTORS",
           "resolve_predictor",
           "gaussian_output_law", "gaussian_kl", "gaussian_schedule_kl", "gaussian_optimal_schedule", "flow_log_density", "wasserstein1",
           "mode_coverage", "ModeCoverage", "mean_log_density", "density_estimate",
           "score_error"]


# --------------------------------------------------------------------------------
# Single steps. ``t_cur`` is the noisier time, ``t_next < t_cur`` the next one.
# --------------------------------------------------------------------------------

def identity_step(score, process, x, t_cur, t_next, rng):
    """Predictor ``none``: ``x`` unchanged (with a corrector: annealed Langevin). 0 NFE."""
    return x, 0


def euler_step(score, process, x, t_cur, t_next, rng):
    """Euler step of the PF-ODE in ``(nu, x/s)``: DDIM (Song et al. 2021). 1 NFE.

    ``x' = a x + b S(x, t_cur)`` with ``a = s'/s``, ``b = s' s nu (nu - nu')``
    (:func:`scoreopt.ddim_coefficients`); depends on the noise levels only.
    """
    a, b = ddim_coefficients(process, t_cur, t_next)
    return a * x + b * score(x, t_cur), 1


def heun_step(score, process, x, t_cur, t_next, rng):
    """Heun's second-order step of the PF-ODE in ``(nu, x/s)``: EDM's sampler (Karras et al. 2022, Alg. 1).

    With ``d(x/s)/d nu = -nu s S(x, t)``: an Euler stage to ``t_next``, then the
    trapezoid correction with the slope there; no second stage on a step that ends
    at ``nu = 0``. 2 NFE (1 on such a step).
    """
    s_cur, s_next = process.s(t_cur), process.s(t_next)
    nu_cur, nu_next = process.nsr(t_cur), process.nsr(t_next)
    d_cur = -nu_cur * s_cur * score(x, t_cur)                      # slope of x/s in nu
    x_bar = x / s_cur + (nu_next - nu_cur) * d_cur                 # Euler stage
    if nu_next == 0:
        return s_next * x_bar, 1
    d_next = -nu_next * s_next * score(s_next * x_bar, t_next)     # second-order correction
    return s_next * (x / s_cur + 0.5 * (nu_next - nu_cur) * (d_cur + d_next)), 2


def ancestral_step(score, process, x, t_cur, t_next, rng):
    """Ancestral (DDPM posterior) step: k-diffusion's ``sample_euler_ancestral``, diffusers' DDPM. 1 NFE.

    In ``y = x / s`` with ``nu = sigma / s``: the denoiser ``D = y + nu^2 s S(x, t_cur)``
    (Tweedie), ``r = (nu'/nu)^2`` and ``y' = r y + (1 - r) D + nu' sqrt(1 - r) xi``,
    ``x' = s(t_next) y'``: a draw from the posterior of ``y'`` given ``y`` and ``x_0 = D``
    (SPEC 7). It equals k-diffusion's ``get_ancestral_step`` with ``sigma_down =
    nu'^2 / nu``, ``sigma_up = nu' sqrt(1 - r)``. A convex combination plus noise, so it
    cannot overshoot, and it depends on the noise levels only.
    """
    s_cur, s_next = process.s(t_cur), process.s(t_next)
    nu_cur, nu_next = process.nsr(t_cur), process.nsr(t_next)
    y = x / s_cur
    denoised = y + nu_cur ** 2 * s_cur * score(x, t_cur)
    r = (nu_next / nu_cur) ** 2
    noise = rng.standard_normal(x.shape)
    return s_next * (r * y + (1.0 - r) * denoised + nu_next * anp.sqrt(1.0 - r) * noise), 1


def euler_maruyama_step(score, process, x, t_cur, t_next, rng):
    """Euler-Maruyama step of the backward SDE ``dX = [f X - g^2 S] dt + g dW``. 1 NFE.

    ``x - h [f x - g^2 S(x, t_cur)] + g sqrt(h) xi`` with ``h = t_cur - t_next > 0``
    (SPEC 7). It works in ``t`` with coefficients frozen at ``t_cur``, so it depends on
    the time parametrisation, and a large step where ``sigma`` changes fast in ``t``
    (``ve``'s geometric sigma, once sigma falls by more than about e) overshoots.
    Kept for comparison: on some VP cases it beats :func:`ancestral_step` (README).
    """
    h = t_cur - t_next
    f, g2 = process.drift(t_cur), process.diffusion_sq(t_cur)
    drift = f * x - g2 * score(x, t_cur)
    return x - h * drift + anp.sqrt(g2 * h) * rng.standard_normal(x.shape), 1


def langevin_step(score, x, t, step_size, rng):
    """One unadjusted Langevin step ``x + eps S(x, t) + sqrt(2 eps) xi`` targeting ``p_t``.

    The sampler uses ``eps = r v(t)^2`` with a dimensionless ratio ``r`` (the
    annealed-Langevin step rule of Song & Ermon 2019 when ``v = sigma``). 1 NFE.
    """
    return x + step_size * score(x, t) + anp.sqrt(2.0 * step_size) * rng.standard_normal(x.shape)


def tweedie_denoise(score, process, x, t):
    """Tweedie's formula ``E[x_0 | x_t] = (x + sigma^2 S(x, t)) / s``. 1 NFE."""
    return (x + process.sigma(t) ** 2 * score(x, t)) / process.s(t)


# Samples beyond this factor times the starting batch's largest |x| (or 1) have exploded:
# no sound sampler step multiplies the scale of the data by a million.
EXPLOSION_FACTOR = 1e6
# wasserstein1 integrates over at most this many times the samples' spread (or 1).
MAX_W1_RANGE = 1e6

PREDICTORS = {"none": identity_step, "euler": euler_step, "heun": heun_step,
              "ancestral": ancestral_step, "euler_maruyama": euler_maruyama_step}


def resolve_predictor(predictor):
    """The step function for a predictor name of :data:`PREDICTORS`, or a callable as it is.

    A step has the contract ``step(score, process, x, t_cur, t_next, rng) -> (x, nfe)``
    and draws its noise, if any, only as ``rng.standard_normal(x.shape)``: that is all
    :func:`gaussian_output_law` (which counts the draws by running the step) and
    :func:`flow_log_density` (which refuses a step that draws) need to know of it.
    """
    if callable(predictor):
        return predictor
    if isinstance(predictor, str) and predictor in PREDICTORS:
        return PREDICTORS[predictor]
    raise ValueError(f"`predictor` must be one of {sorted(PREDICTORS)} or a step function "
                     f"step(score, process, x, t_cur, t_next, rng) -> (x, nfe), got {predictor!r}")


# --------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------

def sample(score, process, ts, x_T, rng, predictor="euler", corrector_steps=0,
           corrector_ratio=0.1, denoise=False, velocity=None, max_growth=EXPLOSION_FACTOR):
    """Predictor-corrector sampling along any schedule (SPEC 7).

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``
    process : scoreopt.Process
    ts : schedule, strictly increasing with ``ts[0] == t_min``, ``ts[-1] == t_max``
    x_T : array (n, d), the starting batch at ``ts[-1]`` (see :func:`prior_sample`)
    rng : numpy Generator or int seed
    predictor : ``"none"``, ``"euler"``, ``"heun"``, ``"ancestral"``, ``"euler_maruyama"``, or
        a step function ``step(score, process, x, t_cur, t_next, rng) -> (x, nfe)``
        (see :func:`resolve_predictor`)
    corrector_steps : int >= 0, Langevin steps after each predictor step
    corrector_ratio : float > 0, ``r`` in the corrector step ``eps = r v(t)^2``
    denoise : bool, finish with Tweedie's formula at ``ts[0]`` (one more NFE)
    velocity : callable ``v(t)``, default ``process.sigma``
    max_growth : float or None. After every step the samples are checked: non-finite
        values, or any ``|x|`` beyond ``max_growth`` times the starting batch's largest
        ``|x|`` (or 1), raise ``FloatingPointError`` naming the step (an unstable setting,
        e.g. ``corrector_ratio=1e6``, or a model that throws samples away). ``None``
        checks finiteness only, for evaluating a model whose stray samples are to be
        counted rather than refused.

    Returns
    -------
    (x, nfe) : samples of shape (n, d) and the number of score evaluations made
        (counting one per batch call).

    Raises ``ValueError`` naming the time (and step) at which the score returned a
    non-finite value or a wrong shape, ``ScoreEvaluationError`` if it raised.
    """
    ts = check_schedule(ts, process)
    x = check_data(x_T, "x_T")
    rng = as_rng(rng)
    predict, v = _check_sampler(score, predictor, corrector_steps, corrector_ratio, velocity, process)
    if max_growth is not None:
        _check_positive(max_growth, "max_growth")
    return _sample_loop(score, process, ts, x, rng, predict, corrector_steps, corrector_ratio, denoise, v,
                        max_growth=max_growth)


def _check_sampler(score, predictor, corrector_steps, corrector_ratio, velocity, process):
    """Validate the sampler's settings; returns the predictor step and the velocity."""
    if not callable(score):
        raise TypeError("`score` must be callable as score(x, t)")
    step = resolve_predictor(predictor)
    _check_int(corrector_steps, "corrector_steps", minimum=0)
    _check_positive(corrector_ratio, "corrector_ratio")
    if velocity is not None and not callable(velocity):
        raise TypeError("`velocity` must be a callable v(t) or None")
    return step, (process.sigma if velocity is None else velocity)


def _sample_loop(score, process, ts, x, rng, predict, corrector_steps, corrector_ratio,
                 denoise, v, check=True, max_growth=EXPLOSION_FACTOR):
    """The sampler's loop on validated arguments (``rng`` needs only ``standard_normal``).

    ``check=False`` skips the finiteness check of every score, so that autograd can
    trace the loop (used for the exact Gaussian law's gradient in ``ts``)."""
    T, nfe = len(ts) - 1, 0
    limit = (np.inf if max_growth is None else max_growth * max(1.0, float(np.max(np.abs(getval(x)))))) \
        if check else None
    for i, (t_cur, t_next) in enumerate(zip(ts[:0:-1], ts[-2::-1])):       # t_N = t_max down to t_0 = t_min
        where = f" (step {i + 1} of {T}, from t = {t_cur:.6g} to t = {t_next:.6g})" if check else ""
        checked = (lambda x, t: _eval_score(score, x, t, where)) if check else score
        x, n = predict(checked, process, x, t_cur, t_next, rng)              # predictor
        nfe += n
        step_size = corrector_ratio * v(t_next) ** 2
        for _ in range(corrector_steps):                                      # corrector
            x = langevin_step(checked, x, t_next, step_size, rng)
        nfe += corrector_steps
        if check:
            _check_samples(x, limit, where)
    if denoise:
        checked = (lambda x, t: _eval_score(score, x, t, " (final denoising)")) if check else score
        x, nfe = tweedie_denoise(checked, process, x, ts[0]), nfe + 1
    return x, nfe


def _check_samples(x, limit, where):
    """Non-finite or exploding samples (beyond ``limit``: ``max_growth`` times the start's
    scale) are an error naming the step: an unstable setting, not a result."""
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"the samples became non-finite{where}: an unstable step size or schedule")
    top = float(np.max(np.abs(x)))
    if top > limit:
        raise FloatingPointError(f"the samples exploded to |x| = {top:.3g}{where}, beyond `max_growth` times the "
                                 "starting batch's scale: an unstable step size or schedule, or a model that "
                                 "throws samples away (max_growth=None to count them instead)")


def prior_sample(process, n, data_var, rng):
    """Starting batch ``x_T ~ N(0, (s(t_max)^2 Var(data) + sigma(t_max)^2) I)``, shape (n, d).

    ``data_var`` is the per-coordinate data variance, shape (d,) (a scalar gives d = 1).
    """
    _check_process(process)
    n = _check_int(n, "n", minimum=1)
    var = prior_variance(process, data_var)
    return np.sqrt(var) * as_rng(rng).standard_normal((n, len(var)))


def prior_variance(process, data_var):
    """Per-coordinate variance of :func:`prior_sample`."""
    data_var = np.atleast_1d(np.asarray(data_var, dtype=float))
    if data_var.ndim != 1 or np.any(data_var < 0) or not np.all(np.isfinite(data_var)):
        raise ValueError("`data_var` must be a finite non-negative vector of shape (d,)")
    return process.s(process.t_max) ** 2 * data_var + process.sigma(process.t_max) ** 2


# --------------------------------------------------------------------------------
# Exact evaluation (SPEC 10)
# --------------------------------------------------------------------------------

class _CountingNoise:
    """Stands in for ``rng``: zeros, counting the draws (to size the probe batch)."""

    def __init__(self):
        self.calls = 0

    def standard_normal(self, shape):
        self.calls += 1
        return np.zeros(shape)


class _ProbeNoise:
    """Stands in for ``rng``: the k-th draw is 1 on row ``2 + k`` and 0 elsewhere."""

    def __init__(self):
        self.calls = 0

    def standard_normal(self, shape):
        out = np.zeros(shape)
        out[2 + self.calls] = 1.0
        self.calls += 1
        return out


class _NoNoise:
    """Stands in for ``rng`` where a step must be deterministic."""

    def standard_normal(self, shape):
        raise ValueError("`predictor` draws noise: the change of variables needs a "
                         "deterministic step")


def gaussian_output_law(target, process, ts, predictor="euler", corrector_steps=0,
                        corrector_ratio=0.1, denoise=False, velocity=None, start=None):
    """Exact law of :func:`sample`'s output for Gaussian data with its exact score (derived).

    With a diagonal Gaussian target the score is affine and acts coordinate-wise, so
    every predictor and corrector step is ``x' = A x + b + c xi`` per coordinate and the
    whole sampler is ``x_out = A x_T + b + sum_k c_k xi_k``. The coefficients are read
    off by running :func:`sample`'s own loop on a probe batch (rows ``x_T = 0``,
    ``x_T = 1``, then one row per noise draw ``xi_k = 1``), so this law is that of the
    implemented sampler, not of a re-derivation. The number of draws is counted by a
    first run on two rows, so any step function (``predictor`` may be a callable, see
    :func:`resolve_predictor`) that is affine in ``x`` and its noise for an affine score,
    as every built-in step is, gets its exact law.

    ``start`` is ``(mean, var)`` of ``x_T`` per coordinate; the default is the law of
    :func:`prior_sample`. Returns ``(mean, var)`` of the output, each of shape (d,).
    """
    ts, law = _gaussian_law(target, process, ts, predictor, corrector_steps, corrector_ratio, denoise,
                            velocity, start)
    return law(ts)


def _gaussian_law(target, process, ts, predictor, corrector_steps, corrector_ratio, denoise, velocity,
                  start):
    """Validate once; returns the checked ``ts`` and ``law(ts) -> (mean, var)`` for schedules
    of the same length, a function autograd can differentiate in ``ts``."""
    if len(getattr(target, "weights", ())) != 1:
        raise ValueError("`target` must be a Gaussian (one component) for an exact law")
    ts = check_schedule(ts, process)
    score = lambda x, t: target.score(x, t, process)
    predict, v = _check_sampler(score, predictor, corrector_steps, corrector_ratio, velocity, process)
    d = target.dim
    mean_T, var_T = (np.zeros(d), prior_variance(process, target.variance())) if start is None else start
    run = lambda ts, x, noise, check: _sample_loop(score, process, ts, x, noise, predict, corrector_steps,
                                                   corrector_ratio, denoise, v, check)[0]
    counter = _CountingNoise()
    run(ts, np.zeros((2, d)), counter, True)     # also checks that the scores are finite
    probe = np.zeros((2 + counter.calls, d))
    probe[1] = 1.0

    def law(ts):
        out = run(ts, probe, _ProbeNoise(), False)
        b, A, c = out[0], out[1] - out[0], out[2:] - out[0]
        return A * mean_T + b, A ** 2 * var_T + anp.sum(c ** 2, axis=0)
    return ts, law


def gaussian_kl(mean, var, target_mean, target_var):
    """``KL(N(mean, diag(var)) || N(target_mean, diag(target_var)))``.

    ``0.5 sum_k [u_k - log(1 + u_k) + (mean_k - m_k)^2 / lam_k]`` with
    ``u_k = var_k / lam_k - 1``, written with ``log1p`` so that a KL near 0 keeps its
    relative precision (and with ``autograd.numpy``, so that it can be differentiated).
    """
    return float(_kl(*_check_kl_inputs(mean, var, target_mean, target_var)))


def _check_kl_inputs(mean, var, m, lam):
    arrays = [_as_float_array(a, name) for a, name in ((mean, "mean"), (var, "var"), (m, "target_mean"),
                                                (lam, "target_var"))]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("`mean`, `var`, `target_mean` and `target_var` must have one shape")
    if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(arrays[1] <= 0) or np.any(arrays[3] <= 0):
        raise ValueError("the means must be finite and the variances `var`, `target_var` finite and positive")
    return arrays


def _kl(mean, var, m, lam):
    u = var / lam - 1.0
    return 0.5 * anp.sum(u - anp.log1p(u) + (mean - m) ** 2 / lam)


def gaussian_schedule_kl(target, process, ts, predictor="euler", corrector_steps=0, corrector_ratio=0.1):
    """Exact ``KL(sampler output || p_{t_min})`` for Gaussian data with its exact score (derived).

    The law of :func:`gaussian_output_law` against the marginal at ``t_min`` (the law
    every sampler here targets when it does not denoise).
    """
    goal = target.marginal(process, process.t_min)
    return gaussian_kl(*gaussian_output_law(target, process, ts, predictor, corrector_steps, corrector_ratio),
                       goal.mean(), goal.variance())


def gaussian_optimal_schedule(target, process, T, predictor="heun", corrector_steps=0, corrector_ratio=0.1,
                              starts=None, max_iter=300, n_refine=2):
    """The KL-optimal ``T``-step schedule of a sampler for Gaussian data: the limit (derived, SPEC 14.1).

    Minimises the exact ``KL(output || p_{t_min})`` (:func:`gaussian_schedule_kl`) over
    the interior times, parametrised by softmax increments of ``t`` (``t_i = t_min +
    (t_max - t_min) sum_{j<i} softmax(z)_j``: every ``z`` gives a valid schedule). The
    exact law is differentiated in ``ts`` by autograd through the sampler's own loop, and
    ``log KL`` is minimised by L-BFGS (``scipy.optimize.minimize``). Starts: every
    baseline of :func:`scoreopt.baseline_schedules` (arctan with the data's root mean
    variance) and the caller's ``starts``; the ``n_refine`` best are optimised and the best
    schedule seen is returned, so the result is never worse than any start. It is the
    yardstick for every schedule rule with this sampler and ``T``.

    For ``predictor="euler_maruyama"`` the minimum is degenerate: the step's per-step
    variance errors change sign, so the optimiser cancels them (KL near 1e-25); that is
    no yardstick.

    Returns the schedule, shape ``(T + 1,)``.
    """
    T = _check_steps(T)
    n_refine = _check_int(n_refine, "n_refine", minimum=1)
    candidates = dict(baseline_schedules(process, T, float(np.sqrt(np.mean(target.variance())))))
    for i, ts in enumerate(starts or []):
        candidates[f"start {i}"] = check_schedule(ts, process, name="starts")
    if any(len(ts) != T + 1 for ts in candidates.values()):
        raise ValueError(f"every schedule in `starts` must have T + 1 = {T + 1} times")
    _, law = _gaussian_law(target, process, candidates["uniform"], predictor, corrector_steps,
                             corrector_ratio, False, None, None)
    goal = target.marginal(process, process.t_min)
    m, lam = goal.mean(), goal.variance()
    t_min, span = process.t_min, process.t_max - process.t_min

    def schedule(z):
        w = anp.exp(z - anp.max(z))
        inner = t_min + span * anp.cumsum(w / anp.sum(w))[:-1]
        return anp.concatenate([anp.array([t_min]), inner, anp.array([process.t_max])])

    def log_kl(z):
        return anp.log(_kl(*law(schedule(z)), m, lam) + 1e-300)

    value_grad = value_and_grad(log_kl)
    scored = sorted((log_kl(np.log(np.diff(ts))), name) for name, ts in candidates.items())
    best_value, best_ts = scored[0][0], candidates[scored[0][1]]
    for _, name in scored[:n_refine]:
        with np.errstate(divide="ignore", invalid="ignore"):    # sqrt'(0) at an endpoint
            res = minimize(lambda z: tuple(np.asarray(v, float) for v in value_grad(z)),
                           np.log(np.diff(candidates[name])), jac=True, method="L-BFGS-B",
                           options={"maxiter": _check_int(max_iter, "max_iter", minimum=1)})
        ts = np.asarray(schedule(res.x), dtype=float)
        ts[0], ts[-1] = process.t_min, process.t_max
        if np.all(np.diff(ts) > 0) and res.fun < best_value:
            best_value, best_ts = float(res.fun), ts
    return best_ts


def flow_log_density(score, process, ts, x_T, log_prob_T, predictor="euler"):
    """Exact output density of a deterministic 1-D sampler by the change of variables (derived).

    Tracks ``log|dx_out/dx_T|`` along the trajectory, differentiating each step map
    (the same step the sampler uses: ``"euler"``, ``"heun"`` or any deterministic step
    function, which must be written in ``autograd.numpy``) with autograd, so
    ``log p_out(x_out) = log p_T(x_T) - log|dx_out/dx_T|``. With samples ``x_T`` from
    ``p_T``, ``mean(log p_out(x_out) - log p_0(x_out))`` estimates ``KL(p_out || p_0)``
    with no density estimation. ``score`` must be autograd-differentiable in ``x``.
    Valid only while every step map is increasing (a coarse step can fold the line,
    giving a point several preimages): a ``ValueError`` names the first step that folds
    at one of the given samples.

    A step that draws noise (``"ancestral"``, ``"euler_maruyama"``) raises ``ValueError``.
    Returns ``(x_out, log_density)`` of shapes (n, 1) and (n,).
    """
    step = resolve_predictor(predictor)
    ts = check_schedule(ts, process)
    x = check_data(x_T, "x_T")
    if x.shape[1] != 1:
        raise ValueError("`x_T` must have one column: the flow density is for 1-D data")
    log_density = np.asarray(log_prob_T(x), dtype=float).reshape(-1)
    for t_cur, t_next in zip(ts[:0:-1], ts[-2::-1]):
        step_map = lambda y: step(score, process, y, t_cur, t_next, _NoNoise())[0]
        slope = elementwise_grad(lambda y: anp.sum(step_map(y)))(x)[:, 0]
        if np.any(slope <= 0):
            name = getattr(step, "__name__", "predictor")
            raise ValueError(f"the {name} from t = {t_cur:.6g} to t = {t_next:.6g} "
                             "folds the line (slope <= 0 at some samples): the change of "
                             "variables does not apply; use smaller steps")
        x = _check_finite(step_map(x), t_next, x.shape)
        log_density = log_density - np.log(slope)
    return x, log_density


def wasserstein1(samples, cdf, grid_size=200_001):
    """``W1 = int |F_n(x) - F(x)| dx`` between 1-D samples and an exact CDF.

    The integral runs over the samples' range widened, by doubling, until ``F`` is below
    1e-12 and above ``1 - 1e-12``, on a uniform grid of ``grid_size`` points (trapezoid
    rule). A CDF that does not reach those levels within ``MAX_W1_RANGE`` times the
    samples' spread (or 1) (a constant function, or tails too heavy for a grid, as a
    Cauchy law's, whose W1 is infinite) is a ``ValueError``, not a hang.
    """
    x = _check_samples_1d(samples, "samples", minimum=1)
    if not callable(cdf):
        raise TypeError("`cdf` must be callable as cdf(x) on an array")
    grid_size = _check_int(grid_size, "grid_size", minimum=3)
    lo, hi = x[0], x[-1]
    width = max(hi - lo, 1e-3)
    bound = MAX_W1_RANGE * max(hi - lo, 1.0)
    while True:
        lo_value, hi_value = float(cdf(np.array(lo))), float(cdf(np.array(hi)))
        if lo_value <= 1e-12 and hi_value >= 1 - 1e-12:
            break
        if hi - lo > bound:
            raise ValueError(f"`cdf` does not reach 1e-12 and 1 - 1e-12 within {MAX_W1_RANGE:.0e} times the "
                             "samples' spread (or 1): it is not a CDF, or its tails are too heavy for W1 "
                             "on a grid (a Cauchy law has none)")
        lo, hi = (lo - width if lo_value > 1e-12 else lo), (hi + width if hi_value < 1 - 1e-12 else hi)
        width *= 2.0
    grid = np.linspace(lo, hi, grid_size)
    values = np.asarray(cdf(grid), dtype=float)
    if values.shape != grid.shape or not np.all(np.isfinite(values)) or np.any(np.diff(values) < -1e-12) \
            or values.min() < -1e-12 or values.max() > 1 + 1e-12:
        raise ValueError("`cdf` must return finite, non-decreasing values in [0, 1], one per point")
    empirical = np.searchsorted(x, grid, side="right") / len(x)
    return float(trapezoid(np.abs(empirical - values), grid))


def _check_samples_1d(samples, name, minimum):
    """Finite 1-D samples (any shape with one value per sample), sorted; at least ``minimum``."""
    x = np.sort(_as_float_array(samples, name).reshape(-1))
    if len(x) < minimum:
        raise ValueError(f"`{name}` needs at least {minimum} sample{'s' if minimum > 1 else ''}, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` must be finite")
    return x


class ModeCoverage(NamedTuple):
    masses: np.ndarray   # fraction of samples within `radius` of each mode
    covered: int         # modes holding at least half their fair share (weight)
    radius: float


def mode_coverage(samples, modes, weights=None, radius=None):
    """Mass of samples within ``radius`` of each 1-D mode, and how many modes hold a fair share.

    A mode is covered when it holds at least half of its weight (equal weights by
    default). The default radius is a quarter of the smallest distance between modes.
    """
    x = _check_samples_1d(samples, "samples", minimum=1)
    modes = _as_float_array(modes, "modes").reshape(-1)          # in the caller's order, as `weights`
    if len(modes) == 0 or not np.all(np.isfinite(modes)):
        raise ValueError("`modes` must be a non-empty array of finite values")
    weights = np.full(len(modes), 1 / len(modes)) if weights is None else _as_float_array(weights, "weights").reshape(-1)
    if weights.shape != modes.shape or np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("`weights` must be finite, non-negative, one per mode")
    if radius is None:
        gaps = np.diff(np.sort(modes))
        if len(modes) > 1 and gaps.min() <= 0:
            raise ValueError("`modes` must be distinct for the default radius (pass `radius`)")
        radius = 0.25 * gaps.min() if len(modes) > 1 else 1.0
    radius = _check_positive(radius, "radius")
    masses = np.mean(np.abs(x[:, None] - modes[None, :]) <= radius, axis=0)
    return ModeCoverage(masses, int(np.sum(masses >= 0.5 * weights)), float(radius))


def mean_log_density(samples, target):
    """Mean log-density of samples under the true ``p_0`` (the paper's "average likelihood")."""
    values = np.asarray(target.log_prob(samples), dtype=float)
    if values.size == 0:
        raise ValueError("`samples` must not be empty")
    return float(np.mean(values))


def density_estimate(samples, grid, bandwidth=None):
    """Gaussian kernel density estimate of 1-D samples on ``grid`` (for plots only)."""
    x = _check_samples_1d(samples, "samples", minimum=2)
    if x[0] == x[-1]:
        raise ValueError("`samples` must not all be equal: a kernel density needs a spread")
    return gaussian_kde(x, bw_method=bandwidth)(_as_float_array(grid, "grid"))


def score_error(score, exact_score, process, ts, x0, rng):
    """``E_{i, x ~ p_{t_i}} sigma(t_i)^2 ||S_theta(x, t_i) - S(x, t_i)||^2`` over the levels of ``ts``.

    ``x = s x0 + sigma eps`` with fresh ``eps`` per level. Returns ``(mean, stderr)``;
    the standard error treats the levels' estimates as independent.
    """
    _check_process(process)
    ts = check_schedule(ts, process, endpoints=False, min_len=1)
    x0, rng = check_data(x0), as_rng(rng)
    if len(x0) < 2:
        raise ValueError("`x0` needs at least 2 samples for a standard error")
    if not (callable(score) and callable(exact_score)):
        raise TypeError("`score` and `exact_score` must be callable as score(x, t)")
    per_level = []
    for t in ts:
        x = _noised(process, x0, t, rng)
        diff = _eval_score(score, x, t) - _eval_score(exact_score, x, t, name="exact_score")
        per_level.append(process.sigma(t) ** 2 * np.sum(diff ** 2, axis=1))
    per_level = np.array(per_level)
    n = per_level.shape[1]
    return float(per_level.mean()), float(np.sqrt(np.sum(per_level.var(axis=1, ddof=1) / n)) / len(ts))
