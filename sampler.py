"""The predictor-corrector sampler for any schedule, its exact evaluation, schedules made for
a sampler, and the evaluation metrics.

``sample(score, process, ts, x_T, rng, ...)`` walks any valid schedule ``ts`` from
``ts[-1]`` down to ``ts[0]``: at each pair ``t_cur > t_next`` a predictor step from
``t_cur`` to ``t_next``, then ``corrector_steps`` unadjusted Langevin steps at
``t_next``. Every single step is a small function of its own with the contract

    step(score, process, x, t_cur, t_next, rng) -> (x, nfe)

where ``t_cur`` and ``t_next`` are floats or arrays ``(n,)`` (one step per row, used by
the schedule rules below to evaluate many intervals in one score call), and noise is
drawn only as ``rng.standard_normal(x.shape)``. A *multistep* step (DPM-Solver++(2M))
also takes and returns the state it carries from one step to the next:
``step(score, process, x, t_cur, t_next, rng, carry) -> (x, nfe, carry)``, with
``carry = None`` at the first step; it is marked by ``step.multistep = True`` and the
sampler's loop threads the state explicitly. ``step.order`` (1 or 2) is the step's order
of accuracy, which the schedule rules use.

Schedules made for a sampler (derived here; docs/derivations.md, sections 6-9): the
KL-optimal limit for Gaussian data, the sampler's step cost from the Stein identity, the
local error against the model's own flow (the recommended schedule for a trained model),
teacher-trajectory dynamic programming (GITS) and the coupled-error oracle.

This module uses only public functions of ``scoreopt``.
"""

import inspect
import time
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad, value_and_grad
from autograd.tracer import getval
from scipy.integrate import trapezoid
from scipy.optimize import minimize
from scipy.spatial.distance import cdist
from scipy.stats import gaussian_kde

from scoreopt import (Estimate, ScoreEvaluationError, as_rng, as_real_array, baseline_schedules, check_bool,
                      check_callable, check_data, check_int, check_positive, check_process, check_real,
                      check_schedule, check_step_times, checked_score, ddim_coefficients, equal_cost_schedule, loglinear_schedule,
                      mean_stderr, noised, time_from_nsr)

__all__ = ["sample", "Sampled", "prior_sample", "prior_variance",
           "identity_step", "euler_step", "heun_step", "ancestral_step", "euler_maruyama_step",
           "dpmpp_2m_step", "langevin_step", "tweedie_denoise", "PREDICTORS", "resolve_predictor",
           "GaussianLaw", "gaussian_output_law", "gaussian_kl", "gaussian_schedule_kl", "FlowDensity",
           "flow_log_density",
           "gaussian_optimal_schedule", "step_cost", "gaussian_step_cost", "FlowWeight", "flow_weight",
           "flow_error_cost", "equal_error_schedule", "TeacherSchedule", "teacher_schedule", "coupled_error",
           "OracleSchedule", "coupled_optimal_schedule",
           "wasserstein1", "ModeCoverage", "mode_coverage", "mean_log_density", "density_estimate",
           "score_error", "ScoreErrorByLevel", "score_error_by_level", "sliced_wasserstein", "mmd2"]


# --------------------------------------------------------------------------------
# Single steps. ``t_cur`` is the noisier time, ``t_next < t_cur`` the next one.
# --------------------------------------------------------------------------------

def _col(a):
    """A per-row coefficient (shape (n,)) as a column (n, 1); scalars as they are."""
    return anp.reshape(a, (-1, 1)) if anp.ndim(a) else a


def identity_step(score, process, x, t_cur, t_next, rng):
    """Predictor ``none``: ``x`` unchanged (with a corrector: annealed Langevin). 0 NFE."""
    return x, 0


def euler_step(score, process, x, t_cur, t_next, rng):
    """Euler step of the PF-ODE in ``(nu, x/s)``: DDIM (Song et al. 2021). 1 NFE.

    ``x' = a x + b S(x, t_cur)`` with ``a = s'/s``, ``b = s' s nu (nu - nu')``
    (:func:`scoreopt.ddim_coefficients`); depends on the noise levels only.
    """
    a, b = ddim_coefficients(process, t_cur, t_next)
    return _col(a) * x + _col(b) * score(x, t_cur), 1


def heun_step(score, process, x, t_cur, t_next, rng):
    """Heun's second-order step of the PF-ODE in ``(nu, x/s)``: EDM's sampler (Karras et al. 2022, Alg. 1).

    With ``d(x/s)/d nu = -nu s S(x, t)``: an Euler stage to ``t_next``, then the
    trapezoid correction with the slope there; no second stage on a step (a row, with
    per-row times) that ends at ``nu = 0``. 2 NFE (1 when every row ends at ``nu = 0``).
    """
    s_cur, s_next = _col(process.s(t_cur)), _col(process.s(t_next))
    nu_cur, nu_next = _col(process.nsr(t_cur)), _col(process.nsr(t_next))
    d_cur = -nu_cur * s_cur * score(x, t_cur)                      # slope of x/s in nu
    x_bar = x / s_cur + (nu_next - nu_cur) * d_cur                 # Euler stage
    last = np.asarray(getval(nu_next)) == 0
    if np.all(last):
        return s_next * x_bar, 1
    if np.any(last):                                               # per row: second stage where nu' > 0
        rows = ~last[:, 0]
        x_out = np.array(s_next * x_bar)
        d_next = -nu_next[rows] * s_next[rows] * score(s_next[rows] * x_bar[rows], np.asarray(t_next)[rows])
        x_out[rows] = s_next[rows] * (x[rows] / s_cur[rows] + 0.5 * (nu_next[rows] - nu_cur[rows])
                                      * (d_cur[rows] + d_next))
        return x_out, 2
    d_next = -nu_next * s_next * score(s_next * x_bar, t_next)     # second-order correction
    return s_next * (x / s_cur + 0.5 * (nu_next - nu_cur) * (d_cur + d_next)), 2


def ancestral_step(score, process, x, t_cur, t_next, rng):
    """Ancestral (DDPM posterior) step: k-diffusion's ``sample_euler_ancestral``, diffusers' DDPM. 1 NFE.

    In ``y = x / s`` with ``nu = sigma / s``: the denoiser ``D = y + nu^2 s S(x, t_cur)``
    (Tweedie), ``r = (nu'/nu)^2`` and ``y' = r y + (1 - r) D + nu' sqrt(1 - r) xi``,
    ``x' = s(t_next) y'``: a draw from the posterior of ``y'`` given ``y`` and ``x_0 = D``
    (Ho et al. 2020). It equals k-diffusion's ``get_ancestral_step`` with ``sigma_down =
    nu'^2 / nu``, ``sigma_up = nu' sqrt(1 - r)``. A convex combination plus noise, so it
    cannot overshoot, and it depends on the noise levels only.
    """
    return _posterior_step(score, process, x, t_cur, t_next, rng.standard_normal(x.shape)), 1


def _posterior_step(score, process, x, t_cur, t_next, noise):
    s_cur, s_next = _col(process.s(t_cur)), _col(process.s(t_next))
    nu_cur, nu_next = _col(process.nsr(t_cur)), _col(process.nsr(t_next))
    y = x / s_cur
    denoised = y + nu_cur ** 2 * s_cur * score(x, t_cur)
    r = (nu_next / nu_cur) ** 2
    return s_next * (r * y + (1.0 - r) * denoised + nu_next * anp.sqrt(1.0 - r) * noise)


def euler_maruyama_step(score, process, x, t_cur, t_next, rng):
    """Euler-Maruyama step of the backward SDE ``dX = [f X - g^2 S] dt + g dW``. 1 NFE.

    ``x - h [f x - g^2 S(x, t_cur)] + g sqrt(h) xi`` with ``h = t_cur - t_next > 0``. It
    works in ``t`` with coefficients frozen at ``t_cur``, so it depends on the time
    parametrisation, and a large step where ``sigma`` changes fast in ``t`` (``ve``'s
    geometric sigma, once sigma falls by more than about e) overshoots. Kept for
    comparison: on some VP cases it beats :func:`ancestral_step` (README).
    """
    h = _col(t_cur - t_next)
    f, g2 = _col(process.drift(t_cur)), _col(process.diffusion_sq(t_cur))
    drift = f * x - g2 * score(x, t_cur)
    return x - h * drift + anp.sqrt(g2 * h) * rng.standard_normal(x.shape), 1


def dpmpp_2m_step(score, process, x, t_cur, t_next, rng, carry=None):
    """DPM-Solver++(2M) (Lu et al. 2022), as k-diffusion's ``sample_dpmpp_2m``: a multistep step. 1 NFE.

    In ``y = x / s``, ``lambda = -log nu``, ``h = lambda' - lambda``, with the denoiser
    ``D = y + nu^2 s S(x, t_cur)``: ``y' = (nu'/nu) y - expm1(-h) D_d``, where
    ``D_d = D`` on the first step (``carry`` None; DPM-Solver++(1), i.e. DDIM) and otherwise
    ``D_d = (1 + 1/(2r)) D - (1/(2r)) D_prev`` with ``r = h_prev / h`` from the state
    ``carry = (D_prev, t_prev)`` of the step before. Returns ``(x', 1, (D, t_cur))``.
    """
    s_cur, s_next = _col(process.s(t_cur)), _col(process.s(t_next))
    nu_cur, nu_next = _col(process.nsr(t_cur)), _col(process.nsr(t_next))
    y = x / s_cur
    denoised = y + nu_cur ** 2 * s_cur * score(x, t_cur)
    h = anp.log(nu_cur) - anp.log(nu_next)
    if carry is None:
        drift = denoised
    else:
        previous, t_prev = carry
        r = (anp.log(_col(process.nsr(t_prev))) - anp.log(nu_cur)) / h
        drift = (1.0 + 0.5 / r) * denoised - (0.5 / r) * previous
    return s_next * ((nu_next / nu_cur) * y - anp.expm1(-h) * drift), 1, (denoised, t_cur)


def langevin_step(score, x, t, step_size, rng):
    """One unadjusted Langevin step ``x + eps S(x, t) + sqrt(2 eps) xi`` targeting ``p_t``.

    The sampler uses ``eps = r v(t)^2`` with a dimensionless ratio ``r`` (the
    annealed-Langevin step rule of Song & Ermon 2019 when ``v = sigma``). 1 NFE.
    """
    return x + step_size * score(x, t) + anp.sqrt(2.0 * step_size) * rng.standard_normal(x.shape)


def tweedie_denoise(score, process, x, t):
    """Tweedie's formula ``E[x_0 | x_t] = (x + sigma^2 S(x, t)) / s``. 1 NFE."""
    return (x + process.sigma(t) ** 2 * score(x, t)) / process.s(t)


for _step, _order in ((identity_step, 0), (euler_step, 1), (heun_step, 2), (ancestral_step, 1),
                      (euler_maruyama_step, 1), (dpmpp_2m_step, 2)):
    _step.order = _order
dpmpp_2m_step.multistep = True

PREDICTORS = {"none": identity_step, "euler": euler_step, "heun": heun_step, "ancestral": ancestral_step,
              "euler_maruyama": euler_maruyama_step, "dpmpp_2m": dpmpp_2m_step}


def resolve_predictor(predictor):
    """The step function for a predictor name of :data:`PREDICTORS`, or a callable as it is.

    A step has the contract ``step(score, process, x, t_cur, t_next, rng) -> (x, nfe)``
    (``carry`` in and out as well for a step marked ``multistep``) and draws its noise,
    if any, only as ``rng.standard_normal(x.shape)``: that is all
    :func:`gaussian_output_law` (which counts the draws by running the step) and
    :func:`flow_log_density` (which refuses a step that draws) need to know of it. A
    callable's signature is checked here, against the contract.
    """
    if isinstance(predictor, str) and predictor in PREDICTORS:
        return PREDICTORS[predictor]
    if not callable(predictor):
        raise ValueError(f"`predictor` must be one of {sorted(PREDICTORS)} or a step function "
                         f"step(score, process, x, t_cur, t_next, rng) -> (x, nfe), got {predictor!r}")
    arguments = (None,) * (7 if getattr(predictor, "multistep", False) else 6)
    try:
        inspect.signature(predictor).bind(*arguments)
    except TypeError as err:
        raise TypeError(f"`predictor` {_name(predictor)} does not take the step's arguments (score, process, x, "
                        f"t_cur, t_next, rng{', carry' if len(arguments) == 7 else ''}): {err}") from None
    except ValueError:    # no signature to inspect (a builtin): checked at its first call
        pass
    return predictor


def _name(step):
    return f"`{getattr(step, '__name__', type(step).__name__)}`"


# --------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------

# Samples beyond this factor times the starting batch's largest |x| (or 1) have exploded:
# no sound sampler step multiplies the scale of the data by a million.
EXPLOSION_FACTOR = 1e6


class Sampled(NamedTuple):
    """What :func:`sample` returns."""
    x: np.ndarray       # samples, (n, d)
    nfe: int            # score evaluations, one per batch call of the whole batch


def sample(score, process, ts, x_T, rng, *, predictor="euler", corrector_steps=0, corrector_ratio=0.1,
           denoise=False, velocity=None, max_growth=EXPLOSION_FACTOR, batch_size=None, callback=None):
    """Predictor-corrector sampling along any schedule.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``
    process : scoreopt.Process
    ts : schedule, strictly increasing with ``ts[0] == t_min``, ``ts[-1] == t_max``
    x_T : array (n, d), the starting batch at ``ts[-1]`` (see :func:`prior_sample`)
    rng : numpy Generator or int seed
    predictor : ``"none"``, ``"euler"``, ``"heun"``, ``"ancestral"``, ``"euler_maruyama"``,
        ``"dpmpp_2m"``, or a step function (see :func:`resolve_predictor`)
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
    batch_size : int or None, at most this many rows per score call (identical samples)
    callback : ``callback(step, T, info)`` after every step, ``info`` with ``t`` and ``elapsed``

    Returns
    -------
    Sampled : ``(x, nfe)``, the samples (n, d) and the number of score evaluations made
        (counting one per call on the whole batch).

    Raises ``ValueError`` naming the time and step at which the score returned a
    non-finite value or a wrong shape, ``ScoreEvaluationError`` if it raised, and
    ``TypeError`` naming a step function that breaks the step contract.
    """
    process = check_process(process)
    ts, x = check_schedule(ts, process), check_data(x_T, "x_T")
    predict, v = _sampler_iv(score, predictor, corrector_steps, corrector_ratio, velocity, process)
    if max_growth is not None:
        check_positive(max_growth, "max_growth")
    if callback is not None:
        check_callable(callback, "callback", "callback(step, T, info)")
    return Sampled(*_sample_loop(checked_score(score, batch_size=batch_size), process, ts, x, as_rng(rng), predict,
                                 corrector_steps, corrector_ratio, check_bool(denoise, "denoise"), v,
                                 max_growth=max_growth, callback=callback))


def _sampler_iv(score, predictor, corrector_steps, corrector_ratio, velocity, process):
    """Validate the sampler's settings; returns the predictor step and the velocity."""
    check_callable(score, "score", "score(x, t)")
    step = resolve_predictor(predictor)
    check_int(corrector_steps, "corrector_steps", minimum=0)
    check_positive(corrector_ratio, "corrector_ratio")
    if velocity is not None:
        check_callable(velocity, "velocity", "v(t)")
    return step, (process.sigma if velocity is None else velocity)


def _sample_loop(score, process, ts, x, rng, predict, corrector_steps, corrector_ratio, denoise, v,
                 check=True, max_growth=EXPLOSION_FACTOR, callback=None):
    """The sampler's loop on validated arguments (``rng`` needs only ``standard_normal``).

    ``check=False`` skips the checks of every step's output, so that autograd can trace the
    loop (the exact Gaussian law's gradient in ``ts``, the oracle's); ``score`` is then
    the raw callable."""
    T, nfe, carry = len(ts) - 1, 0, None
    multistep = getattr(predict, "multistep", False)
    limit = (np.inf if max_growth is None else max_growth * max(1.0, float(np.max(np.abs(getval(x)))))) \
        if check else None
    start = time.perf_counter()
    for i, (t_cur, t_next) in enumerate(zip(ts[:0:-1], ts[-2::-1])):       # t_N = t_max down to t_0 = t_min
        try:
            if multistep:                                                  # predictor
                out = predict(score, process, x, t_cur, t_next, rng, carry)
                x, n, carry = _step_output(out, x.shape, predict, 3) if check else out
            else:
                out = predict(score, process, x, t_cur, t_next, rng)
                x, n = _step_output(out, x.shape, predict, 2) if check else out
            if corrector_steps:                                            # corrector
                step_size = corrector_ratio * v(t_next) ** 2
                if check and not (np.isfinite(step_size) and step_size > 0):
                    raise ValueError(f"`velocity` returned {v(t_next)} at t = {t_next:.6g}: the corrector's step "
                                     "size must be finite and positive")
                for _ in range(corrector_steps):
                    x = langevin_step(score, x, t_next, step_size, rng)
        except (ValueError, ScoreEvaluationError) as err:
            if not check:
                raise
            raise type(err)(f"{err}{_where(i, T, t_cur, t_next)}") from (err.__cause__ or err)
        nfe += n + corrector_steps
        if check:
            _check_samples(x, limit, _where(i, T, t_cur, t_next))
        if callback is not None:
            callback(i + 1, T, {"t": float(t_next), "elapsed": time.perf_counter() - start})
    if denoise:
        x, nfe = tweedie_denoise(score, process, x, ts[0]), nfe + 1
    return x, nfe


def _where(i, T, t_cur, t_next):
    return f" (step {i + 1} of {T}, from t = {t_cur:.6g} to t = {t_next:.6g})"


def _step_output(out, shape, step, size):
    """A step's result, checked against the contract: ``(x, nfe)`` (``(x, nfe, carry)`` for a
    multistep step) with ``x`` a finite array of the batch's shape and ``nfe`` an integer."""
    if not (isinstance(out, tuple) and len(out) == size):
        want = "(x, nfe)" if size == 2 else "(x, nfe, carry)"
        raise TypeError(f"the step {_name(step)} returned {type(out).__name__} where {want} was expected")
    x, nfe = out[0], out[1]
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 0:
        raise TypeError(f"the step {_name(step)} returned nfe = {nfe!r}; it must be a non-negative integer")
    if not isinstance(x, np.ndarray) or x.shape != shape:
        found = f"shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"the step {_name(step)} returned {found} for x; expected an array of shape {shape}")
    return out


def _check_samples(x, limit, where):
    """Non-finite or exploding samples (beyond ``limit``: ``max_growth`` times the start's
    scale) are an error naming the step: an unstable setting, not a result."""
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
    process, n = check_process(process), check_int(n, "n", minimum=1)
    var = prior_variance(process, data_var)
    return np.sqrt(var) * as_rng(rng).standard_normal((n, len(var)))


def prior_variance(process, data_var):
    """Per-coordinate variance of :func:`prior_sample`."""
    data_var = np.atleast_1d(as_real_array(data_var, "data_var"))
    if data_var.ndim != 1 or np.any(data_var < 0) or not np.all(np.isfinite(data_var)):
        raise ValueError("`data_var` must be a finite non-negative vector of shape (d,)")
    return process.s(process.t_max) ** 2 * data_var + process.sigma(process.t_max) ** 2


# --------------------------------------------------------------------------------
# Exact evaluation for Gaussian data (docs/derivations.md, section 6)
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
        raise ValueError("`predictor` draws noise: the change of variables needs a deterministic step")


class GaussianLaw(NamedTuple):
    """Mean and variance per coordinate of a Gaussian law, each (d,)."""
    mean: np.ndarray
    var: np.ndarray


def gaussian_output_law(target, process, ts, *, predictor="euler", corrector_steps=0, corrector_ratio=0.1,
                        denoise=False, velocity=None, start=None):
    """Exact law of :func:`sample`'s output for Gaussian data with its exact score (derived).

    With a diagonal Gaussian target the score is affine and acts coordinate-wise, so
    every predictor and corrector step is ``x' = A x + b + c xi`` per coordinate and the
    whole sampler is ``x_out = A x_T + b + sum_k c_k xi_k``. The coefficients are read
    off by running :func:`sample`'s own loop on a probe batch (rows ``x_T = 0``,
    ``x_T = 1``, then one row per noise draw ``xi_k = 1``), so this law is that of the
    implemented sampler, not of a re-derivation (docs/derivations.md, section 6). The
    number of draws is counted by a first run on two rows, so any step function that is
    affine in ``x`` and its noise for an affine score, as every built-in step is
    (DPM-Solver++(2M) included: its state is affine too), gets its exact law.

    ``start`` is ``(mean, var)`` of ``x_T`` per coordinate; the default is the law of
    :func:`prior_sample`. Returns a :class:`GaussianLaw`.
    """
    ts, law = _gaussian_law(target, process, ts, predictor, corrector_steps, corrector_ratio,
                            check_bool(denoise, "denoise"), velocity, start)
    return GaussianLaw(*law(ts))


def _gaussian_law(target, process, ts, predictor, corrector_steps, corrector_ratio, denoise, velocity, start):
    """Validate once; returns the checked ``ts`` and ``law(ts) -> (mean, var)`` for schedules
    of the same length, a function autograd can differentiate in ``ts``."""
    if len(getattr(target, "weights", ())) != 1:
        raise ValueError("`target` must be a Gaussian (one component) for an exact law")
    process = check_process(process)
    ts = check_schedule(ts, process)
    score = _TargetScore(target, process)
    predict, v = _sampler_iv(score, predictor, corrector_steps, corrector_ratio, velocity, process)
    d = target.dim
    mean_T, var_T = (np.zeros(d), prior_variance(process, target.variance())) if start is None else start
    run = lambda ts, x, noise, check: _sample_loop(checked_score(score) if check else score, process, ts, x, noise,
                                                   predict, corrector_steps, corrector_ratio, denoise, v, check)[0]
    counter = _CountingNoise()
    run(ts, np.zeros((2, d)), counter, True)     # also checks that the scores are finite
    probe = np.zeros((2 + counter.calls, d))
    probe[1] = 1.0

    def law(ts):
        out = run(ts, probe, _ProbeNoise(), False)
        b, A, c = out[0], out[1] - out[0], out[2:] - out[0]
        return A * mean_T + b, A ** 2 * var_T + anp.sum(c ** 2, axis=0)
    return ts, law


class _TargetScore:
    """A target's exact score as ``score(x, t)`` (picklable, per-row times)."""

    def __init__(self, target, process):
        self.target, self.process = target, process

    def __call__(self, x, t):
        return self.target.score(x, t, self.process)


def gaussian_kl(mean, var, target_mean, target_var):
    """``KL(N(mean, diag(var)) || N(target_mean, diag(target_var)))``.

    ``0.5 sum_k [u_k - log(1 + u_k) + (mean_k - m_k)^2 / lam_k]`` with
    ``u_k = var_k / lam_k - 1``, written with ``log1p`` so that a KL near 0 keeps its
    relative precision (and with ``autograd.numpy``, so that it can be differentiated).
    """
    return float(_kl(*_kl_iv(mean, var, target_mean, target_var)))


def _kl_iv(mean, var, m, lam):
    arrays = [as_real_array(a, name) for a, name in ((mean, "mean"), (var, "var"), (m, "target_mean"),
                                                     (lam, "target_var"))]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("`mean`, `var`, `target_mean` and `target_var` must have one shape")
    if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(arrays[1] <= 0) or np.any(arrays[3] <= 0):
        raise ValueError("the means must be finite and the variances `var`, `target_var` finite and positive")
    return arrays


def _kl(mean, var, m, lam):
    u = var / lam - 1.0
    return 0.5 * anp.sum(u - anp.log1p(u) + (mean - m) ** 2 / lam)


def gaussian_schedule_kl(target, process, ts, *, predictor="euler", corrector_steps=0, corrector_ratio=0.1):
    """Exact ``KL(sampler output || p_{t_min})`` for Gaussian data with its exact score (derived).

    The law of :func:`gaussian_output_law` against the marginal at ``t_min`` (the law
    every sampler here targets when it does not denoise).
    """
    goal = target.marginal(process, process.t_min)
    law = gaussian_output_law(target, process, ts, predictor=predictor, corrector_steps=corrector_steps,
                              corrector_ratio=corrector_ratio)
    return gaussian_kl(law.mean, law.var, goal.mean(), goal.variance())


class FlowDensity(NamedTuple):
    """What :func:`flow_log_density` returns."""
    x: np.ndarray             # the sampler's output, (n, 1)
    log_density: np.ndarray   # its exact log-density, (n,)


def flow_log_density(score, process, ts, x_T, log_prob_T, *, predictor="euler"):
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

    A step that draws noise (``"ancestral"``, ``"euler_maruyama"``) or carries a state
    (``"dpmpp_2m"``) raises ``ValueError``. Returns a :class:`FlowDensity`.
    """
    step = resolve_predictor(predictor)
    if getattr(step, "multistep", False):
        raise ValueError("`predictor` carries a state from step to step; the change of variables here "
                         "follows one-step maps")
    process = check_process(process)
    ts, x = check_schedule(ts, process), check_data(x_T, "x_T")
    check_callable(log_prob_T, "log_prob_T", "log_prob_T(x)")
    if x.shape[1] != 1:
        raise ValueError("`x_T` must have one column: the flow density is for 1-D data")
    checked = checked_score(score)
    log_density = np.asarray(log_prob_T(x), dtype=float).reshape(-1)
    for t_cur, t_next in zip(ts[:0:-1], ts[-2::-1]):
        step_map = lambda y: step(score, process, y, t_cur, t_next, _NoNoise())[0]
        slope = elementwise_grad(lambda y: anp.sum(step_map(y)))(x)[:, 0]
        if np.any(slope <= 0):
            raise ValueError(f"the step {_name(step)} from t = {t_cur:.6g} to t = {t_next:.6g} "
                             "folds the line (slope <= 0 at some samples): the change of "
                             "variables does not apply; use smaller steps")
        x = checked.check(step(checked, process, x, t_cur, t_next, _NoNoise())[0], x, t_next)
        log_density = log_density - np.log(slope)
    return FlowDensity(x, log_density)


# --------------------------------------------------------------------------------
# Schedules made for a sampler (derived here; docs/derivations.md, sections 7-9)
# --------------------------------------------------------------------------------

def _softmax_schedule(z, t_min, t_max):
    """A valid schedule from any real vector ``z``: ``t_i = t_min + (t_max - t_min) sum_{j<i} w_j``
    with ``w = softmax(z)`` floored at 1e-9 of the range (so that no two times coincide, even
    where the optimiser's line search drives a weight to zero); autograd-differentiable, and
    ``z = log(diff(ts))`` gives back ``ts`` to 1e-9."""
    w = anp.exp(z - anp.max(z))
    w = (1.0 - 1e-9 * len(z)) * w / anp.sum(w) + 1e-9
    inner = t_min + (t_max - t_min) * anp.cumsum(w)[:-1]
    return anp.concatenate([anp.array([t_min]), inner, anp.array([t_max])])


def _minimise_schedule(objective, candidates, process, n_refine, max_iter):
    """L-BFGS on ``objective(ts)`` over softmax increments, from the ``n_refine`` best of
    ``candidates`` (a dict of schedules); the best schedule seen, never worse than a start.
    Returns ``(ts, value, values of the candidates)``."""
    lo, hi = process.t_min, process.t_max
    value_grad = value_and_grad(lambda z: objective(_softmax_schedule(z, lo, hi)))
    scored = {name: float(objective(ts)) for name, ts in candidates.items()}
    order = sorted(scored, key=scored.get)
    best_value, best_ts = scored[order[0]], candidates[order[0]]
    for name in order[:n_refine]:
        with np.errstate(divide="ignore", invalid="ignore"):    # sqrt'(0) at an endpoint
            res = minimize(lambda z: tuple(np.asarray(v, float) for v in value_grad(z)),
                           np.log(np.diff(candidates[name])), jac=True, method="L-BFGS-B",
                           options={"maxiter": max_iter})
        ts = np.asarray(_softmax_schedule(res.x, lo, hi), dtype=float)
        ts[0], ts[-1] = lo, hi
        if np.all(np.diff(ts) > 0) and np.isfinite(res.fun) and res.fun < best_value:
            best_value, best_ts = float(res.fun), ts
    return best_ts, best_value, scored


def _starting_schedules(process, T, c, starts):
    """Every baseline of ``scoreopt.baseline_schedules`` and the caller's ``starts``, by name."""
    candidates = dict(baseline_schedules(process, T, c))
    for i, ts in enumerate(starts or []):
        candidates[f"start {i}"] = check_schedule(ts, process, name="starts")
    if any(len(ts) != T + 1 for ts in candidates.values()):
        raise ValueError(f"every schedule in `starts` must have T + 1 = {T + 1} times")
    return candidates


def gaussian_optimal_schedule(target, process, T, *, predictor="heun", corrector_steps=0, corrector_ratio=0.1,
                              starts=None, max_iter=300, n_refine=2):
    """The KL-optimal ``T``-step schedule of a sampler for Gaussian data: the limit (derived).

    Minimises the exact ``KL(output || p_{t_min})`` (:func:`gaussian_schedule_kl`) over
    the interior times, parametrised by softmax increments of ``t`` (every vector gives a
    valid schedule). The exact law is differentiated in ``ts`` by autograd through the
    sampler's own loop, and ``log KL`` is minimised by L-BFGS (``scipy.optimize.minimize``).
    Starts: every baseline of :func:`scoreopt.baseline_schedules` (arctan with the data's
    root mean variance) and the caller's ``starts``; the ``n_refine`` best are optimised and
    the best schedule seen is returned, so the result is never worse than any start. It
    is the yardstick for every schedule rule with this sampler and ``T``
    (docs/derivations.md, section 7).

    For ``predictor="euler_maruyama"`` the minimum is degenerate: the step's per-step
    variance errors change sign, so the optimiser cancels them (KL below 1e-10); that is
    no yardstick, and nor is it for ``"dpmpp_2m"`` in one dimension, whose second-order
    correction cancels the same way (docs/derivations.md, section 7). Returns the schedule, shape ``(T + 1,)``.
    """
    process = check_process(process)
    T, n_refine = check_int(T, "T", minimum=1), check_int(n_refine, "n_refine", minimum=1)
    candidates = _starting_schedules(process, T, float(np.sqrt(np.mean(target.variance()))), starts)
    _, law = _gaussian_law(target, process, candidates["uniform"], predictor, corrector_steps, corrector_ratio,
                           False, None, None)
    goal = target.marginal(process, process.t_min)
    m, lam = goal.mean(), goal.variance()
    objective = lambda ts: anp.log(_kl(*law(ts), m, lam) + 1e-300)
    return _minimise_schedule(objective, candidates, process, n_refine, check_int(max_iter, "max_iter", 1))[0]


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
    very accurate) scores; for a trained model use :func:`flow_error_cost`.

    Parameters
    ----------
    score : callable ``score(x, t) -> (n, d)``
    process : scoreopt.Process
    t_cur, t_next : floats (or arrays of one shape, one interval each), ``t_next < t_cur``
    x0 : array (n, d), data samples, ``n >= 2 n_groups``
    rng : numpy Generator or int seed (draws ``x`` and the step's noise)
    step : a one-step sampler step or its name (:data:`PREDICTORS`); not a multistep one
    affine : bool, add the constant test function
    n_groups : int >= 2

    Returns
    -------
    Estimate : ``(value, stderr)``. The value may be slightly negative by Monte-Carlo error
        (it is unbiased); ``scoreopt.interval_costs`` clips it at zero. Over 30 seeds
        (N(0, diag k^-1.5), d = 8, 10,000 samples) the estimates scattered 1.15-1.22 times
        the reported jackknife error: it is slightly optimistic with 10 groups.
    """
    score, process, t_cur, t_next, x0, rng = _cost_args(score, process, t_cur, t_next, x0, rng)
    step = _one_step(step, "step_cost")
    affine, n_groups = check_bool(affine, "affine"), check_int(n_groups, "n_groups", minimum=2)
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
    y = _step_output(step(score, process, x, t, t2, rng), x.shape, step, 2)[0]
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


class FlowWeight(NamedTuple):
    """The propagation weight of :func:`flow_error_cost`, prepared once from the data."""
    kind: str                 # "data", "kl" or "scalar"
    basis: np.ndarray         # eigenvectors U of the data covariance (d, d); None for "scalar"
    variances: np.ndarray     # its eigenvalues (d,); the mean variance (1,) for "scalar"


def flow_weight(x0, kind="data"):
    """The weight of :func:`flow_error_cost` for data ``x0``: ``"data"`` (the squared gain of the
    exact flow from ``t'`` to ``t_min`` for Gaussian data with ``x0``'s covariance: for sample
    quality), ``"kl"`` (the same whitened: for the KL of the output) or ``"scalar"`` (every
    eigenvalue replaced by the mean variance: no ``d x d`` matrix, for image-sized ``d``).
    ``"data"`` and ``"kl"`` cost one covariance and its eigendecomposition, ``O(n d^2 + d^3)``
    time and ``O(d^2)`` memory, once (docs/derivations.md, section 9)."""
    x0 = check_data(x0, min_rows=2)
    if kind not in ("data", "kl", "scalar"):
        raise ValueError(f"`weight` must be 'data', 'kl', 'scalar' or a FlowWeight, got {kind!r}")
    if kind == "scalar":
        return FlowWeight(kind, None, np.array([float(np.mean(x0.var(axis=0)))]))
    lam, U = np.linalg.eigh(np.atleast_2d(np.cov(x0.T)))
    return FlowWeight(kind, U, np.maximum(lam, 0.0))


def _weighted_error(weight, process, delta, t_next):
    """Per row ``(1/d) sum_k w_k(t') (U^T delta)_k^2`` (docs/derivations.md, section 9)."""
    d = delta.shape[1]
    coords = delta if weight.basis is None else delta @ weight.basis
    s0, sigma0 = float(process.s(process.t_min)), float(process.sigma(process.t_min))
    s1, sigma1 = _col(process.s(t_next)), _col(process.sigma(t_next))
    lam = weight.variances[None, :]
    A0, A1 = s0 ** 2 * lam + sigma0 ** 2, s1 ** 2 * lam + sigma1 ** 2
    gain2 = A0 / A1                                    # squared gain of the flow from t' to t_min
    w = gain2 / A0 if weight.kind == "kl" else gain2
    return np.sum(w * coords ** 2, axis=1) / d


def flow_error_cost(score, process, t_cur, t_next, x0, rng, *, step="euler", weight="data", n_substeps=2):
    """Local error of the sampler's step against the model's own flow (derived, docs/derivations.md, 9).

    The classical rule of ODE step-size control, with the model as the ODE: a schedule
    cannot remove a model's error, but it sets the sampler's discretisation error, and
    that can be measured against the model itself. For a deterministic step ``Phi`` from
    ``t`` to ``t' < t``:

        x = s(t) x0 + sigma(t) eps          (one eps for every interval: common random numbers)
        delta = Phi(x; t -> t') - Phi_K(x; t -> t')
        L(t, t') = (1 / (n d)) sum_rows sum_k w_k(t') (U^T delta)_k^2

    where ``Phi_K`` is ``n_substeps`` Heun substeps of the same score (equally spaced in
    ``asinh(nu / c)``, ``c`` the data's scale), and ``w`` the propagation weight (:func:`flow_weight`): an error made at
    ``t'`` is carried to the end of sampling. For the ancestral step, whose error is in its
    law rather than its path, the cost is its local error in law: the posterior covariance
    its output lacks, ``(1 - r)^2 nu^2 E[dD/dy]``, from the model's own Jacobian, weighted
    with the reverse SDE's gain (no reference solve). DPM-Solver++(2M) starts each interval with the state it would carry there on
    the model's flow (its previous level, when the intervals are a schedule's). Other
    stochastic steps are refused. All intervals are evaluated in one score call per stage
    (one time per row).

    Parameters
    ----------
    score : callable ``score(x, t)`` accepting one time per row (``scoreopt.rowwise_score``
        adapts one that does not)
    process : scoreopt.Process
    t_cur, t_next : floats, or arrays of one shape (one interval each), ``t_next < t_cur``
    x0 : array (n, d), the training points (n = 32 is enough: docs/derivations.md)
    rng : numpy Generator or int seed (draws ``eps``, and the substeps' noise)
    step : a step or its name; weight : ``"data"``, ``"kl"``, ``"scalar"`` or a
        :class:`FlowWeight`; n_substeps : int >= 1

    Returns
    -------
    Estimate : ``(value, stderr)`` of the shape of ``t_cur``, the standard error over rows.
    Zero when ``step`` is ``Phi_K`` itself.
    """
    score, process, t_cur, t_next, x0, rng = _cost_args(score, process, t_cur, t_next, x0, rng)
    step = resolve_predictor(step)
    weight = weight if isinstance(weight, FlowWeight) else flow_weight(x0, weight)
    K = check_int(n_substeps, "n_substeps", minimum=1)
    shape, t, t2 = np.shape(t_cur), np.ravel(t_cur), np.ravel(t_next)
    T, (n, d) = len(t), x0.shape
    eps = rng.standard_normal(x0.shape)
    rows_t, rows_t2 = np.repeat(t, n), np.repeat(t2, n)
    x = _col(process.s(rows_t)) * np.tile(x0, (T, 1)) + _col(process.sigma(rows_t)) * np.tile(eps, (T, 1))
    c = np.sqrt(np.mean(weight.variances))
    if step is ancestral_step:
        value, stderr = _ancestral_weak_error(score, process, x, rows_t, rows_t2, n, weight, rng)
    else:
        if getattr(step, "multistep", False):
            coarse = _multistep_coarse(step, score, process, x, rows_t, rows_t2,
                                       *_carry_from_flow(score, process, x, t, t2, n, K, c))
        else:
            coarse = _deterministic(step, score, process, x, rows_t, rows_t2, None)
        fine = _heun_substeps(score, process, x, rows_t, rows_t2, K, c)
        value, stderr = mean_stderr(_weighted_error(weight, process, coarse - fine, rows_t2).reshape(T, n))
    return Estimate(float(value[0]), float(stderr[0])) if shape == () else Estimate(value.reshape(shape),
                                                                                    stderr.reshape(shape))


def _substep_times(process, t, t2, K, c):
    """``K + 1`` times from ``t`` down to ``t2`` (rows of (K + 1, m)), the ends exact, equally spaced
    in ``asinh(nu / c)``, ``c`` the data's scale: linear in ``nu`` below it, where the flow is
    smooth in ``nu``, logarithmic above, where it is smooth in ``log nu`` (docs/derivations.md, 9)."""
    nu, nu2 = process.nsr(t), process.nsr(t2)
    u, c = np.arange(K + 1)[:, None] / K, max(float(c), 1e-12)
    grid = c * np.sinh(np.arcsinh(nu / c)[None, :] + u * (np.arcsinh(nu2 / c) - np.arcsinh(nu / c))[None, :])
    out = np.empty_like(grid)
    out[0], out[-1] = t, t2
    if K > 1:
        out[1:-1] = time_from_nsr(process, np.clip(grid[1:-1], min(nu2.min(), nu.min()), max(nu.max(), nu2.max())))
    return out


def _heun_substeps(score, process, x, t, t2, K, c):
    """``K`` Heun steps from ``t`` to ``t2`` (per row), spaced by :func:`_substep_times`: the reference flow."""
    times = _substep_times(process, t, t2, K, c)
    for k in range(K):
        x = heun_step(score, process, x, times[k], times[k + 1], None)[0]
    return x


def _ancestral_weak_error(score, process, x, t, t2, n, weight, rng, n_groups=4):
    """The ancestral step's local error in law, per interval: its output lacks the posterior
    covariance, ``E[y' y'^T]`` falls short of the exact one by ``(1 - r)^2 E[Cov(x0 | y)]``
    with ``Cov(x0 | y) = nu^2 dD/dy`` (Tweedie), whatever the data (docs/derivations.md, 9.3).
    ``dD/dy`` is estimated per row by one finite difference of the model along a Rademacher
    direction (Hutchinson's diagonal estimate in the weight's eigenbasis); the weighted square
    of its mean is a U-statistic over ``n_groups`` row groups, unbiased, with a jackknife error."""
    s, nu, nu2 = _col(process.s(t)), _col(process.nsr(t)), _col(process.nsr(t2))
    y = x / s
    z = rng.choice([-1.0, 1.0], size=x.shape)
    v = z if weight.basis is None else z @ weight.basis.T
    h = 1e-4 * np.sqrt(np.mean(weight.variances) + nu ** 2)
    denoise = lambda y: y + nu ** 2 * s * score(s * y, t)
    Jv = (denoise(y + h * v) - denoise(y)) / h
    diagonal = z * (Jv if weight.basis is None else Jv @ weight.basis)        # E = diag(U^T J U)
    deficit = (1.0 - (nu2 / nu) ** 2) ** 2 * nu ** 2 * diagonal               # second-moment deficit
    lam = weight.variances[None, :]
    nu0 = float(process.nsr(process.t_min))
    gain2 = ((lam + nu0 ** 2) / (lam + nu2 ** 2)) ** 2                         # variance gain to t_min
    w = gain2 ** 2 / (lam + nu0 ** 2) ** (2 if weight.kind == "kl" else 1)
    values = np.sqrt(w / x.shape[1]) * deficit
    out = []
    for rows in values.reshape(-1, n, x.shape[1]):
        groups = np.array_split(rows, n_groups)
        out.append(_pair_product_mean(np.array([g.mean(axis=0) for g in groups])))
    return Estimate(*(np.array(c) for c in zip(*out)))


def _deterministic(step, score, process, x, t, t2, carry):
    """The step on per-row times with no noise source: a stochastic step is refused by name."""
    try:
        if getattr(step, "multistep", False):
            return _step_output(step(score, process, x, t, t2, _NoNoise(), carry), x.shape, step, 3)[0]
        return _step_output(step(score, process, x, t, t2, _NoNoise()), x.shape, step, 2)[0]
    except ValueError as err:
        if "draws noise" not in str(err):
            raise
        raise ValueError(f"the step {_name(step)} draws noise: the local error against the model's flow needs a "
                         "deterministic step or the ancestral step (coupled); for another stochastic step use "
                         "step_cost") from None


def _carry_from_flow(score, process, x, t, t2, n, K, c):
    """The state a multistep step carries into each interval: the denoiser at the previous
    (noisier) level of the schedule, on the model's flow through ``x`` (``K`` Heun substeps up).
    The intervals are consecutive when ``t2[i + 1] == t[i]``; the top one (or one without a
    neighbour) starts without a state, as sampling does. Returns ``(rows, carry)``: the rows
    that have a state and that state, ``(D_prev, t_prev)`` for those rows."""
    has_prev = np.zeros(len(t), dtype=bool)
    has_prev[:-1] = t2[1:] == t[:-1]
    rows = np.repeat(has_prev, n)
    if not np.any(rows):
        return rows, None
    t_here, t_prev = np.repeat(t, n)[rows], np.repeat(np.append(t[1:], t[-1]), n)[rows]
    up = _heun_substeps(score, process, x[rows], t_here, t_prev, K, c)
    s, nu = _col(process.s(t_prev)), _col(process.nsr(t_prev))
    return rows, (up / s + nu ** 2 * s * score(up, t_prev), t_prev)


def _multistep_coarse(step, score, process, x, t, t2, rows, carry):
    """A multistep step on per-row times: with its state on ``rows``, first order elsewhere."""
    out = np.empty_like(x)
    if np.any(rows):
        out[rows] = _deterministic(step, score, process, x[rows], t[rows], t2[rows], carry)
    if not np.all(rows):
        out[~rows] = _deterministic(step, score, process, x[~rows], t[~rows], t2[~rows], None)
    return out


def equal_error_schedule(score, process, T, x0, rng, *, step="euler", weight="data", n_samples=32, n_substeps=2,
                         start=None, gamma=0.5, tol=1e-3, max_iter=15, budget=None, batch_size=None, callback=None):
    """The schedule for your model and sampler: equal local error against the model's own flow (derived).

    Equalises :func:`flow_error_cost` of ``step`` over the ``T`` steps with the damped
    Algorithm 1 fixed point (``scoreopt.equal_cost_schedule``): update order ``2 (p + 1)``
    for a step of order ``p``, ``gamma = 0.5``, from the log-linear schedule, until no time
    moves by more than ``tol`` of its local step, at most ``max_iter`` updates. The costs
    use ``n_samples`` rows of ``x0`` (drawn with ``rng``) and one noise draw for every
    interval and iteration; the weight is prepared once from all of ``x0``
    (docs/derivations.md, section 9).

    Parameters
    ----------
    score, process : the model (accepting one time per row) and its process
    T : number of steps; x0 : data (n, d); rng : Generator or int seed
    step : the sampler's step or its name; weight : see :func:`flow_weight`
    budget : int or None, at most this many per-sample score evaluations (fewer updates)
    batch_size, callback : as ``scoreopt.equal_cost_schedule``

    Returns
    -------
    scoreopt.EqualCostResult with ``n_evaluations`` the rows passed to the score.
    """
    process = check_process(process)
    step = resolve_predictor(step)
    T = check_int(T, "T", minimum=1)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    n_samples = check_int(n_samples, "n_samples", minimum=2)
    weight = weight if isinstance(weight, FlowWeight) else flow_weight(x0, weight)
    points = x0[rng.choice(len(x0), min(n_samples, len(x0)), replace=False)]
    start = loglinear_schedule(process, T) if start is None else check_schedule(start, process, name="start")
    if len(start) != T + 1:
        raise ValueError(f"`start` must have T + 1 = {T + 1} times")
    order = 2 * (getattr(step, "order", 1) + 1)
    return equal_cost_schedule(score, process, start, points, rng, cost=flow_error_cost, step=step, weight=weight,
                               n_substeps=n_substeps, gamma=gamma, order=order, max_iter=max_iter, tol=tol,
                               budget=budget, batch_size=batch_size, callback=callback)


class TeacherSchedule(NamedTuple):
    """What :func:`teacher_schedule` returns."""
    ts: np.ndarray          # the cheapest T-step schedule through the grid
    cost: float             # its total cost, sum of c(i, j) along the path
    costs: np.ndarray       # c(i, j), (G + 1, G + 1), node 0 the noisiest; inf where j <= i
    nodes: np.ndarray       # the grid's times, (G + 1,), from t_max down to t_min
    path: np.ndarray        # node indices of the schedule, from 0 to G
    n_evaluations: int      # per-sample score evaluations (rows passed to the score)


def teacher_schedule(score, process, T, x0, rng, *, step="euler", n_draws=32, n_cells=100, n_substeps=2,
                     weight="data", batch_size=None):
    """Teacher-trajectory dynamic programming (GITS, Chen et al., ICML 2024), with this project's weight.

    ``n_draws`` prior draws are solved on a fine grid of ``n_cells`` cells uniform in
    ``log nu`` with the model (``n_substeps`` Heun substeps a cell): the teacher. The cost
    ``c(i, j)`` of one sampler step from the teacher's point at node ``i`` to node ``j`` is
    its weighted squared error against the teacher at ``j`` (the weight of
    :func:`flow_error_cost`); exact dynamic programming finds the cheapest path of ``T``
    steps from the noisiest node to the cleanest. Deterministic one-step samplers only
    (a multistep step's cost depends on the path). Evaluations: ``n_draws (2 K G + G)`` for
    a one-stage step, plus ``n_draws G (G + 1) / 2`` for a second stage (Heun).

    Returns a :class:`TeacherSchedule`.
    """
    score, process = checked_score(score, batch_size=batch_size), check_process(process)
    T = check_int(T, "T", minimum=1)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    step = _one_step(step, "teacher_schedule")
    G, K = check_int(n_cells, "n_cells", minimum=T), check_int(n_substeps, "n_substeps", minimum=1)
    weight = weight if isinstance(weight, FlowWeight) else flow_weight(x0, weight)
    x = prior_sample(process, check_int(n_draws, "n_draws", minimum=2), x0.var(axis=0), rng)
    nu_min, nu_max = (float(v) for v in process.nsr(np.array([process.t_min, process.t_max])))
    nodes = time_from_nsr(process, np.geomspace(nu_max, nu_min, G + 1))
    nodes[0], nodes[-1] = process.t_max, process.t_min
    m, c = len(x), np.sqrt(np.mean(weight.variances))
    teacher = [x]
    for j in range(G):                                             # the teacher's trajectory
        teacher.append(_heun_substeps(score, process, teacher[-1], np.full(m, nodes[j]), np.full(m, nodes[j + 1]), K, c))
    C = np.full((G + 1, G + 1), np.inf)
    for i in range(G):                                             # one step from node i to every j > i
        ends = nodes[i + 1:]
        tiled = np.tile(teacher[i], (len(ends), 1))
        shared = _SharedFirstStage(score, tiled, nodes[i], np.tile(score(teacher[i], nodes[i]), (len(ends), 1)))
        y = _deterministic(step, shared, process, tiled, nodes[i], np.repeat(ends, m), None)
        errors = _weighted_error(weight, process, y - np.concatenate(teacher[i + 1:]), np.repeat(ends, m))
        C[i, i + 1:] = errors.reshape(len(ends), m).mean(axis=1)
    path, total = _cheapest_path(C, T)
    return TeacherSchedule(nodes[path][::-1].copy(), total, C, nodes, path, score.evaluations)


class _SharedFirstStage:
    """``score``, except on the tiled batch at the step's starting time: every step from one node
    to many begins with the same evaluation, made once (the caller's ``value``)."""

    def __init__(self, score, x, t, value):
        self.score, self.x, self.t, self.value = score, x, t, value

    def __call__(self, x, t):
        if x is self.x and np.ndim(t) == 0 and t == self.t:
            return self.value
        return self.score(x, t)


def _cheapest_path(C, T):
    """Exact dynamic programming: the path ``0 = n_0 < n_1 < ... < n_T = G`` minimising
    ``sum_k C[n_{k-1}, n_k]`` (``C[i, j] = inf`` for ``j <= i``). Returns (path, cost)."""
    G = len(C) - 1
    best = np.full(G + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((T + 1, G + 1), dtype=int)
    for k in range(1, T + 1):
        total = best[:, None] + C                 # (from, to)
        back[k] = np.argmin(total, axis=0)
        best = total[back[k], np.arange(G + 1)]
    path = [G]
    for k in range(T, 0, -1):
        path.append(back[k][path[-1]])
    return np.array(path[::-1]), float(best[G])


def coupled_error(score, process, ts, x_T, reference, *, step="euler"):
    """Mean squared distance, per coordinate, of the ``T``-step sample on ``ts`` from the
    prior draws ``x_T`` to ``reference``, the model's own fine solution from the same draws
    (deterministic steps)."""
    process = check_process(process)
    ts, x_T = check_schedule(ts, process), check_data(x_T, "x_T")
    reference = check_data(reference, "reference")
    if reference.shape != x_T.shape:
        raise ValueError(f"`reference` must have the shape of `x_T`, {x_T.shape}")
    step = resolve_predictor(step)
    x = _sample_loop(checked_score(score), process, ts, x_T, _NoNoise(), step, 0, 0.1, False, process.sigma)[0]
    return float(np.mean((x - reference) ** 2))


class OracleSchedule(NamedTuple):
    """What :func:`coupled_optimal_schedule` returns."""
    ts: np.ndarray          # the schedule of least coupled error found
    error: float            # its coupled error on the draws
    start_errors: dict      # the coupled error of every starting schedule, by name
    x_T: np.ndarray         # the prior draws
    reference: np.ndarray   # the model's fine solution from them
    n_evaluations: int      # per-sample score evaluations of the forward passes


def coupled_optimal_schedule(score, process, T, x0, rng, *, step="euler", n_draws=64, reference_steps=200,
                             starts=None, n_refine=2, max_iter=100):
    """The trained-model oracle: the schedule of least coupled error for this model and step (derived).

    Minimises :func:`coupled_error` (mean squared distance of the ``T``-step sample to the
    model's own ``reference_steps``-step Heun solution, log-linear, from the same ``n_draws``
    prior draws) over the interior times: softmax increments, autograd through the sampler's
    loop and the score (which must be autograd-differentiable in ``x`` and ``t`` and take a
    float ``t``), L-BFGS, from the ``n_refine`` best of the baselines and ``starts``. What
    :func:`gaussian_optimal_schedule` is to Gaussian data, this is to a trained model: no
    schedule does better on its own draws, and it is never worse than a start. Deterministic
    steps only. Returns an :class:`OracleSchedule`.
    """
    process, T = check_process(process), check_int(T, "T", minimum=1)
    check_callable(score, "score", "score(x, t)")
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    step = resolve_predictor(step)
    if step is ancestral_step or step is euler_maruyama_step:
        raise ValueError("`step` must be deterministic: the coupled error compares one trajectory with another")
    counted = _CountingScore(score)
    x_T = prior_sample(process, check_int(n_draws, "n_draws", minimum=2), x0.var(axis=0), rng)
    fine = loglinear_schedule(process, check_int(reference_steps, "reference_steps", minimum=T))
    reference = _sample_loop(checked_score(counted), process, fine, x_T, _NoNoise(), heun_step, 0, 0.1, False,
                             process.sigma)[0]
    candidates = _starting_schedules(process, T, float(np.sqrt(np.mean(x0.var(axis=0)))), starts)
    run = lambda ts: _sample_loop(counted, process, ts, x_T, _NoNoise(), step, 0, 0.1, False, process.sigma,
                                  check=False)[0]
    objective = lambda ts: anp.log(anp.mean((run(ts) - reference) ** 2) + 1e-300)
    ts, value, scored = _minimise_schedule(objective, candidates, process, check_int(n_refine, "n_refine", 1),
                                           check_int(max_iter, "max_iter", 1))
    return OracleSchedule(ts, float(np.exp(value)), {k: float(np.exp(v)) for k, v in scored.items()}, x_T,
                          reference, counted.evaluations)


class _CountingScore:
    """The raw score, counting the rows it is given (also while autograd traces it)."""

    def __init__(self, score):
        self.score, self.evaluations = score, 0

    def __call__(self, x, t):
        self.evaluations += len(x)
        return self.score(x, t)


def _cost_args(score, process, t_cur, t_next, x0, rng):
    process = check_process(process)
    t_cur, t_next = check_step_times(t_cur, t_next, process, towards_data=True)
    return checked_score(score), process, t_cur, t_next, check_data(x0, min_rows=2), as_rng(rng)


def _one_step(step, where):
    step = resolve_predictor(step)
    if getattr(step, "multistep", False):
        raise ValueError(f"`step` carries a state from step to step; {where} takes one-step samplers")
    return step


# --------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------

# wasserstein1 integrates over at most this many times the samples' spread (or 1).
MAX_W1_RANGE = 1e6


def wasserstein1(samples, cdf, grid_size=200_001):
    """``W1 = int |F_n(x) - F(x)| dx`` between 1-D samples and an exact CDF.

    The integral runs over the samples' range widened, by doubling, until ``F`` is below
    1e-12 and above ``1 - 1e-12``, on a uniform grid of ``grid_size`` points (trapezoid
    rule). A CDF that does not reach those levels within ``MAX_W1_RANGE`` times the
    samples' spread (or 1) (a constant function, or tails too heavy for a grid, as a
    Cauchy law's, whose W1 is infinite) is a ``ValueError``, not a hang.
    """
    x = _samples_1d(samples, "samples", minimum=1)
    check_callable(cdf, "cdf", "cdf(x) on an array")
    grid_size = check_int(grid_size, "grid_size", minimum=3)
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


def _samples_1d(samples, name, minimum):
    """Finite 1-D samples (any shape with one value per sample), sorted; at least ``minimum``."""
    x = np.sort(as_real_array(samples, name).reshape(-1))
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
    x = _samples_1d(samples, "samples", minimum=1)
    modes = as_real_array(modes, "modes").reshape(-1)          # in the caller's order, as `weights`
    if len(modes) == 0 or not np.all(np.isfinite(modes)):
        raise ValueError("`modes` must be a non-empty array of finite values")
    weights = np.full(len(modes), 1 / len(modes)) if weights is None else as_real_array(weights, "weights").reshape(-1)
    if weights.shape != modes.shape or np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("`weights` must be finite, non-negative, one per mode")
    if radius is None:
        gaps = np.diff(np.sort(modes))
        if len(modes) > 1 and gaps.min() <= 0:
            raise ValueError("`modes` must be distinct for the default radius (pass `radius`)")
        radius = 0.25 * gaps.min() if len(modes) > 1 else 1.0
    radius = check_positive(radius, "radius")
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
    x = _samples_1d(samples, "samples", minimum=2)
    if x[0] == x[-1]:
        raise ValueError("`samples` must not all be equal: a kernel density needs a spread")
    return gaussian_kde(x, bw_method=bandwidth)(as_real_array(grid, "grid"))


def score_error(score, exact_score, process, ts, x0, rng):
    """``E_{i, x ~ p_{t_i}} sigma(t_i)^2 ||S_theta(x, t_i) - S(x, t_i)||^2`` over the levels of ``ts``.

    ``x = s x0 + sigma eps`` with fresh ``eps`` per level. Returns an ``Estimate``; the
    standard error treats the levels' estimates as independent.
    """
    r = score_error_by_level(score, exact_score, process, ts, x0, rng)
    return Estimate(float(r.score_error.mean()), float(np.sqrt(np.sum(r.score_stderr ** 2)) / len(r.ts)))


class ScoreErrorByLevel(NamedTuple):
    """What :func:`score_error_by_level` returns, each array one value per level."""
    ts: np.ndarray
    nu: np.ndarray
    score_error: np.ndarray       # E sigma^2 ||S_theta - S||^2
    score_stderr: np.ndarray
    denoiser_error: np.ndarray    # E ||x0_hat - E[x0 | x]||^2, x0_hat = (x + sigma^2 S_theta) / s
    denoiser_stderr: np.ndarray


def score_error_by_level(score, exact_score, process, ts, x0, rng):
    """A model's error at every level of ``ts``, against the exact score, on data ``x0`` (held out).

    At each level ``x = s x0 + sigma eps`` (fresh ``eps``): the scaled score error
    ``sigma^2 ||S_theta - S||^2`` (dimensionless, ``O(1)`` for a bad model at any level) and
    the error of the denoised estimate, ``||x0_hat - E[x0 | x]||^2 = (sigma^2 / s)^2
    ||S_theta - S||^2``, which carries the score error times ``nu^2``: large at the noisy
    end for a model that predicts the noise. Means over the rows with standard errors.
    """
    process = check_process(process)
    ts = check_schedule(ts, process, endpoints=False, min_len=1)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    score, exact = checked_score(score), checked_score(exact_score, "exact_score")
    levels = []
    for t in ts:
        x = noised(process, x0, t, rng)
        diff2 = np.sum((score(x, t) - exact(x, t)) ** 2, axis=1)
        sigma2, s = float(process.sigma(t)) ** 2, float(process.s(t))
        levels.append((*mean_stderr(sigma2 * diff2), *mean_stderr((sigma2 / s) ** 2 * diff2)))
    columns = np.array(levels).T
    return ScoreErrorByLevel(ts, process.nsr(ts), *columns)


def sliced_wasserstein(x, y, rng, n_projections=256):
    """Sliced W1 between two samples ``(n, d)`` and ``(m, d)``: the mean over ``n_projections``
    random directions (uniform on the sphere, from ``rng``) of the exact 1-D W1 of the
    projections, ``int |F_x(z) - F_y(z)| dz`` of the two empirical CDFs."""
    x, y = check_data(x, "x"), check_data(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    theta = as_rng(rng).standard_normal((check_int(n_projections, "n_projections", minimum=1), x.shape[1]))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    return float(np.mean([_w1_empirical(a, b) for a, b in zip(theta @ x.T, theta @ y.T)]))


def _w1_empirical(a, b):
    """Exact W1 between two 1-D empirical laws: the integral of |F_a - F_b| between the pooled points."""
    z = np.sort(np.concatenate([a, b]))
    Fa = np.searchsorted(np.sort(a), z[:-1], side="right") / len(a)
    Fb = np.searchsorted(np.sort(b), z[:-1], side="right") / len(b)
    return float(np.sum(np.abs(Fa - Fb) * np.diff(z)))


def mmd2(x, y, bandwidth=None):
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel ``exp(-|u - v|^2 / (2 h^2))``.

    ``h`` defaults to the median distance between the pooled samples (the median
    heuristic). The U-statistic ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j)
    - 2 mean k(x_i, y_j)`` is unbiased, so it may be slightly negative for equal laws.
    Memory ``O((n + m)^2)``.
    """
    x, y = check_data(x, "x", min_rows=2), check_data(y, "y", min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    pooled = np.vstack([x, y])
    d2 = cdist(pooled, pooled, "sqeuclidean")
    h2 = (float(np.median(d2[np.triu_indices(len(pooled), 1)])) / 2.0 if bandwidth is None
          else check_positive(bandwidth, "bandwidth") ** 2)
    if h2 <= 0:
        raise ValueError("the samples coincide: the median heuristic gives no bandwidth (pass `bandwidth`)")
    k = np.exp(-d2 / (2.0 * h2))
    n = len(x)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    m = len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())
