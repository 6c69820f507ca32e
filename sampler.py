"""The predictor-corrector sampler for any schedule; schedules made for a sampler; evaluation.

**Part I** is the paper's sampler (it stands alone with Part I of ``scoreopt``): one loop,
``sample``, over consecutive pairs of any schedule, from ``ts[-1]`` down to ``ts[0]``: at each
pair ``t_cur > t_next`` a predictor step, then ``corrector_steps`` unadjusted Langevin steps at
``t_next``. Every step is a small function with the contract

    step(score, process, x, t_cur, t_next, rng) -> (x, nfe)

where ``t_cur`` and ``t_next`` are floats or arrays ``(n,)`` (one step per row) and noise is
drawn only as ``rng.standard_normal(x.shape)``. A *multistep* step (DPM-Solver++(2M)) also
takes and returns the state it carries, ``step(..., rng, carry) -> (x, nfe, carry)`` with
``carry = None`` at the first step, and is marked ``step.multistep = True``; ``step.order`` is
its order of accuracy.

**Part II** is derived or added here (``docs/derivations.md``): Heun's and DPM-Solver++(2M)'s
steps, the exact output law of the sampler for Gaussian data and its KL-optimal schedule, the
local error against the model's own flow (the recommended schedule for a trained model),
teacher-trajectory dynamic programming (GITS), the coupled-error oracle, and the metrics.
"""

import time
from functools import partial
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from scoreopt import (ScoreEvaluationError, as_column, as_rng, as_real_array, check_callable,
                      check_data, check_int, check_positive, check_process, check_schedule, checked_score,
                      ddim_coefficients)

__all__ = ["sample", "Sampled", "prior_sample", "prior_variance", "identity_step", "euler_step", "ancestral_step",
           "euler_maruyama_step", "langevin_step", "tweedie_denoise", "PREDICTORS", "resolve_predictor"]


# ================================================================================
# PART I. THE PAPER'S SAMPLER
# ================================================================================

# -- Single steps. ``t_cur`` is the noisier time, ``t_next < t_cur`` the next one. --

def identity_step(score, process, x, t_cur, t_next, rng):
    """Predictor ``none``: ``x`` unchanged. With a Langevin corrector this is annealed Langevin dynamics,
    the paper's Example 2.1 (the setting of the corrector-optimised cost). 0 NFE.

    >>> identity_step(None, None, np.ones((2, 1)), 0.5, 0.4, None)[1]
    0
    """
    return x, 0


def euler_step(score, process, x, t_cur, t_next, rng):
    """Euler step of the probability-flow ODE in ``(nu, x/s)``: DDIM (Song et al. 2021), the predictor of the
    paper's predictor-optimised cost. ``x' = a x + b S(x, t_cur)`` (``scoreopt.ddim_coefficients``). 1 NFE.

    >>> import scoreopt as so
    >>> score = lambda x, t: -x / (1.0 + so.ve().sigma(t) ** 2)    # N(0, 1) data under ve()
    >>> x, nfe = euler_step(score, so.ve(), np.ones((1, 1)), 1.0, 0.0, None)
    >>> bool(np.isclose(x[0, 0], 1 - 80 * (80 - 0.002) / (1 + 80 ** 2))), nfe    # x + b S, b = nu (nu - nu')
    (True, 1)
    """
    a, b = ddim_coefficients(process, t_cur, t_next)
    return as_column(a) * x + as_column(b) * score(x, t_cur), 1


def ancestral_step(score, process, x, t_cur, t_next, rng):
    """Ancestral (DDPM posterior) step: k-diffusion's ``sample_euler_ancestral``, diffusers' DDPM. 1 NFE.

    In ``y = x / s``, ``nu = sigma / s``, with the denoiser ``D = tweedie_denoise`` and
    ``r = (nu'/nu)^2``: ``y' = r y + (1 - r) D + nu' sqrt(1 - r) xi``, ``x' = s(t_next) y'``, a draw from
    the posterior of ``y'`` given ``y`` and ``x_0 = D`` (Ho et al. 2020); k-diffusion's
    ``sigma_down = nu'^2 / nu``, ``sigma_up = nu' sqrt(1 - r)``. A convex combination plus noise: it
    cannot overshoot.

    >>> import scoreopt as so
    >>> score = lambda x, t: -x / (1.0 + so.ve().sigma(t) ** 2)
    >>> x, nfe = ancestral_step(score, so.ve(), np.zeros((3, 1)), 0.5, 0.4, np.random.default_rng(0))
    >>> x.shape, nfe
    ((3, 1), 1)
    """
    s_cur, s_next = as_column(process.s(t_cur)), as_column(process.s(t_next))
    nu_cur, nu_next = as_column(process.nsr(t_cur)), as_column(process.nsr(t_next))
    r = (nu_next / nu_cur) ** 2
    noise = rng.standard_normal(x.shape)
    return s_next * (r * x / s_cur + (1.0 - r) * tweedie_denoise(score, process, x, t_cur)
                     + nu_next * anp.sqrt(1.0 - r) * noise), 1


def euler_maruyama_step(score, process, x, t_cur, t_next, rng):
    """Euler-Maruyama step of the reverse SDE ``dX = [f X - g^2 S] dt + g dW``. 1 NFE.

    ``x - h [f x - g^2 S(x, t_cur)] + g sqrt(h) xi``, ``h = t_cur - t_next``, coefficients frozen at
    ``t_cur``: it depends on the time parametrisation, and a large step where ``sigma`` changes fast in
    ``t`` overshoots (with ``ve``, a step over which sigma falls by more than a factor of about e).

    >>> import scoreopt as so
    >>> score = lambda x, t: -x / (1.0 + so.vp_linear().sigma(t) ** 2)
    >>> euler_maruyama_step(score, so.vp_linear(), np.zeros((2, 1)), 0.5, 0.4, np.random.default_rng(0))[0].shape
    (2, 1)
    """
    h = as_column(t_cur - t_next)
    f, g2 = as_column(process.drift(t_cur)), as_column(process.diffusion_sq(t_cur))
    return x - h * (f * x - g2 * score(x, t_cur)) + anp.sqrt(g2 * h) * rng.standard_normal(x.shape), 1


def langevin_step(score, x, t, step_size, rng):
    """One unadjusted Langevin step ``x + eps S(x, t) + sqrt(2 eps) xi`` targeting ``p_t`` (the corrector). 1 NFE.

    The sampler uses ``eps = r sigma(t)^2`` with a dimensionless ratio ``r``: the annealed-Langevin
    rule of Song & Ermon (2019), with the paper's velocity ``v = sigma``.

    >>> langevin_step(lambda x, t: -x, np.zeros((2, 1)), 0.5, 0.1, np.random.default_rng(0)).shape
    (2, 1)
    """
    return x + step_size * score(x, t) + anp.sqrt(2.0 * step_size) * rng.standard_normal(x.shape)


def tweedie_denoise(score, process, x, t):
    """Tweedie's formula ``E[x_0 | x_t] = (x + sigma^2 S(x, t)) / s = y + nu^2 s S`` (``y = x / s``): the
    denoiser, and the final denoising step. 1 NFE. ``t`` a float or one per row.

    >>> import scoreopt as so
    >>> score = lambda x, t: -x / (1.0 + so.ve().sigma(t) ** 2)
    >>> float(tweedie_denoise(score, so.ve(), np.ones((1, 1)), 1.0)[0, 0]) < 1e-3   # at nu = 80, E[x_0 | x] ~ 0
    True
    """
    return (x + as_column(process.sigma(t)) ** 2 * score(x, t)) / as_column(process.s(t))


for _step, _order in ((identity_step, 0), (euler_step, 1), (ancestral_step, 1), (euler_maruyama_step, 1)):
    _step.order = _order

PREDICTORS = {"none": identity_step, "euler": euler_step, "ancestral": ancestral_step,
              "euler_maruyama": euler_maruyama_step}


def resolve_predictor(predictor, name="predictor", names=PREDICTORS):
    """The step for a name of ``names`` (:data:`PREDICTORS`), or a callable as it is.

    >>> resolve_predictor("euler") is euler_step
    True
    """
    if isinstance(predictor, str) and predictor in names:
        return names[predictor]
    if not callable(predictor):
        raise ValueError(f"`{name}` must be one of {sorted(names)} or a step function "
                         f"step(score, process, x, t_cur, t_next, rng) -> (x, nfe), got {predictor!r}")
    return predictor


def _name(step):
    return f"`{getattr(step, '__name__', getattr(getattr(step, 'func', None), '__name__', type(step).__name__))}`"


# -- The sampler -----------------------------------------------------------------

# Samples beyond this factor times the starting batch's largest |x| (or 1) have exploded:
# no sound sampler step multiplies the scale of the data by a million.
EXPLOSION_FACTOR = 1e6


class Sampled(NamedTuple):
    """What :func:`sample` returns."""
    x: np.ndarray       # samples, (n, d)
    nfe: int            # score evaluations, one per call on the whole batch


def sample(score, process, ts, x_T, rng, *, predictor="euler", corrector_steps=0, corrector_ratio=0.1,
           denoise=False, max_growth=EXPLOSION_FACTOR, batch_size=None, callback=None):
    """Predictor-corrector sampling along any schedule ``ts``, from ``x_T`` (the caller's draw at ``ts[-1]``,
    e.g. :func:`prior_sample`) down to ``ts[0]``.

    ``predictor``: a name of :data:`PREDICTORS` or a step function. ``corrector_steps`` Langevin steps
    follow each predictor step, with ``eps = corrector_ratio sigma(t)^2``. ``denoise=True`` finishes
    with Tweedie's formula at ``ts[0]`` (one more NFE). After every step the samples are checked:
    non-finite values, or ``|x|`` beyond ``max_growth`` times the start's largest ``|x|`` (or 1), are
    a ``FloatingPointError`` naming the step (``max_growth=None`` checks finiteness only).
    ``batch_size``: at most this many rows per score call (identical samples). ``callback(step, T,
    info)`` after every step. Returns :class:`Sampled` ``(x, nfe)``, ``nfe`` counting one per call on
    the whole batch. A score error names the time and the step.

    >>> import scoreopt as so
    >>> process, score = so.ve(), lambda x, t: -x / (0.25 + so.ve().sigma(t) ** 2)   # N(0, 0.5^2) data
    >>> x_T = prior_sample(process, 20000, [0.25], rng=0)
    >>> x, nfe = sample(score, process, so.edm_schedule(process, 100), x_T, rng=1, predictor="euler")
    >>> round(float(x.std()), 2), nfe                   # Euler is first order: the std tends to 0.5 as T grows
    (0.48, 100)
    """
    process = check_process(process)
    ts, x = check_schedule(ts, process), check_data(x_T, "x_T")
    predict = _sampler_iv(score, predictor, corrector_steps, corrector_ratio)
    if callback is not None:
        check_callable(callback, "callback", "callback(step, T, info)")
    predict, after = checked_steps(predict, ts, x, max_growth, callback)
    return Sampled(*_sample_loop(checked_score(score, batch_size=batch_size, process=process), process, ts, x,
                                 as_rng(rng), predict, corrector_steps, corrector_ratio, denoise,
                                 after))


def _sampler_iv(score, predictor, corrector_steps, corrector_ratio):
    check_callable(score, "score", "score(x, t)")
    check_int(corrector_steps, "corrector_steps", 0)
    check_positive(corrector_ratio, "corrector_ratio")
    return resolve_predictor(predictor)


def _sample_loop(score, process, ts, x, rng, predict, corrector_steps=0, corrector_ratio=0.1, denoise=False,
                 callback=None):
    """The sampler's loop, in EDM's shape, on checked arguments (``rng`` needs only ``standard_normal``). It
    checks nothing itself, so that autograd can trace it: :func:`sample` passes the checks in with the step
    and the callback (:func:`checked_steps`)."""
    T, nfe, carry, start = len(ts) - 1, 0, None, time.perf_counter()
    for i, (t_cur, t_next) in enumerate(zip(ts[:0:-1], ts[-2::-1])):          # t_T = t_max down to t_0 = t_min
        # Predictor, from t_cur to t_next
        if getattr(predict, "multistep", False):
            x, n, carry = predict(score, process, x, t_cur, t_next, rng, carry)
        else:
            x, n = predict(score, process, x, t_cur, t_next, rng)
        # Corrector: Langevin steps at t_next with eps = r sigma^2 (velocity v = sigma)
        for _ in range(corrector_steps):
            x = langevin_step(score, x, t_next, corrector_ratio * process.sigma(t_next) ** 2, rng)
        nfe += n + corrector_steps
        if callback is not None:
            callback(i + 1, T, {"t": t_next, "t_cur": t_cur, "x": x, "elapsed": time.perf_counter() - start})
    # Final denoising at t_0: Tweedie's formula
    if denoise:
        x, nfe = tweedie_denoise(score, process, x, ts[0]), nfe + 1
    return x, nfe


def checked_steps(predict, ts, x_T, max_growth=EXPLOSION_FACTOR, callback=None):
    """The sampler's checks, wrapped around its step: ``(predict, callback)`` for the loop. The step's output
    is checked against the contract and an error in it names the step; after every step of the schedule (its
    predictor and corrector steps) non-finite samples, or ``|x|`` beyond ``max_growth`` times the start's
    largest ``|x|`` (or 1), are a ``FloatingPointError`` naming the step; then ``callback`` is called as it is."""
    if max_growth is not None:
        check_positive(max_growth, "max_growth")
    limit = np.inf if max_growth is None else max_growth * max(1.0, float(np.max(np.abs(getval(x_T)))))
    return _CheckedStep(predict, len(ts) - 1), partial(_after_step, limit, callback)


def _where(i, T, t_cur, t_next):
    return f" (step {i} of {T}, from t = {float(t_cur):.6g} to t = {float(t_next):.6g})"


class _CheckedStep:
    """A step whose output is checked (:func:`_step_output`) and whose errors name the step."""

    def __init__(self, step, T):
        self.step, self.T, self.i, self.multistep = step, T, 0, getattr(step, "multistep", False)

    def __call__(self, score, process, x, t_cur, t_next, rng, *carry):
        self.i += 1
        try:
            return _step_output(self.step(score, process, x, t_cur, t_next, rng, *carry), x.shape, self.step,
                                2 + len(carry))
        except (ValueError, ScoreEvaluationError) as err:
            raise type(err)(f"{err}{_where(self.i, self.T, t_cur, t_next)}") from (err.__cause__ or err)


def _after_step(limit, callback, i, T, info):
    _check_samples(info["x"], limit, _where(i, T, info["t_cur"], info["t"]))
    if callback is not None:
        callback(i, T, {"t": float(info["t"]), "elapsed": info["elapsed"]})


def _step_output(out, shape, step, size):
    """A step's result checked against the contract: ``(x, nfe)`` (``(x, nfe, carry)`` for a multistep
    step), ``x`` an array of the batch's shape, ``nfe`` a non-negative integer."""
    if not (isinstance(out, tuple) and len(out) == size):
        raise TypeError(f"the step {_name(step)} returned {type(out).__name__} where "
                        f"{'(x, nfe)' if size == 2 else '(x, nfe, carry)'} was expected")
    x, nfe = out[0], out[1]
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 0:
        raise TypeError(f"the step {_name(step)} returned nfe = {nfe!r}; it must be a non-negative integer")
    if not isinstance(x, np.ndarray) or x.shape != shape:
        found = f"shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"the step {_name(step)} returned {found} for x; expected an array of shape {shape}")
    return out


def _check_samples(x, limit, where):
    """Non-finite or exploding samples (beyond ``limit``) are an error naming the step."""
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"the samples became non-finite{where}: an unstable step size or schedule")
    top = float(np.max(np.abs(x)))
    if top > limit:
        raise FloatingPointError(f"the samples exploded to |x| = {top:.3g}{where}, beyond `max_growth` times the "
                                 "starting batch's scale: an unstable step size or schedule, or a model that "
                                 "throws samples away (max_growth=None to count them instead)")


def prior_sample(process, n, data_var, rng):
    """The starting batch ``x_T ~ N(0, (s(t_max)^2 Var(data) + sigma(t_max)^2) I)``, shape ``(n, d)``;
    ``data_var`` is the data's variance per coordinate, ``(d,)``.

    >>> import scoreopt as so
    >>> prior_sample(so.ve(), 3, [1.0, 1.0], rng=0).shape
    (3, 2)
    """
    process, n = check_process(process), check_int(n, "n", 1)
    var = prior_variance(process, data_var)
    return np.sqrt(var) * as_rng(rng).standard_normal((n, len(var)))


def prior_variance(process, data_var):
    """Per-coordinate variance of :func:`prior_sample`.

    >>> import scoreopt as so
    >>> prior_variance(so.ve(), [1.0]).round(1).tolist()
    [6401.0]
    """
    data_var = np.atleast_1d(as_real_array(data_var, "data_var"))
    if data_var.ndim != 1 or np.any(data_var < 0) or not np.all(np.isfinite(data_var)):
        raise ValueError("`data_var` must be a finite non-negative vector of shape (d,)")
    return process.s(process.t_max) ** 2 * data_var + process.sigma(process.t_max) ** 2


# ================================================================================
# PART II. DERIVED OR ADDED HERE (docs/derivations.md)
# ================================================================================

import inspect                                                              # noqa: E402
import warnings                                                             # noqa: E402
from functools import wraps                                                 # noqa: E402

from autograd import elementwise_grad, value_and_grad                       # noqa: E402
from scipy.integrate import trapezoid                                       # noqa: E402
from scipy.optimize import minimize                                         # noqa: E402
from scipy.spatial.distance import cdist                                    # noqa: E402
from scipy.stats import gaussian_kde                                        # noqa: E402

from scoreopt import (Estimate, EqualCostResult, baseline_schedules, check_bool, check_data_range,  # noqa: E402
                      check_data_scale, check_real, check_step_times, consumer_schedules, equal_cost_schedule,
                      guest_score, loglinear_schedule, mean_stderr, noised, nsr, nsr_range, stop_at_budget,
                      time_from_nsr, _iterate)

__all__ += ["heun_step", "dpmpp_2m_step", "ALL_PREDICTORS", "resolve_step", "GaussianLaw", "gaussian_output_law",
            "gaussian_kl", "gaussian_schedule_kl", "FlowDensity", "flow_log_density", "gaussian_optimal_schedule",
            "FlowWeight", "flow_weight", "flow_error_cost", "equal_error_schedule", "TeacherSchedule",
            "teacher_schedule", "coupled_error", "OracleSchedule", "coupled_optimal_schedule", "levels_for_calls",
            "sample_calls", "equal_error_calls", "Recommendation", "KINDS", "recommended_schedule", "wasserstein1",
            "ModeCoverage", "mode_coverage", "mean_log_density", "density_estimate", "score_error",
            "ScoreErrorByLevel", "score_error_by_level", "sliced_wasserstein", "mmd2"]


# -- EDM's Heun step and DPM-Solver++(2M) ----------------------------------------

def heun_step(score, process, x, t_cur, t_next, rng):
    """Heun's second-order step of the probability-flow ODE in ``(nu, x/s)``: EDM's sampler (Karras et al.
    2022, Alg. 1). An Euler stage, then the trapezoid correction with the slope there; no second stage on
    a row that ends at ``nu = 0``. 2 NFE (1 when every row ends at ``nu = 0``)."""
    s_cur, s_next = as_column(process.s(t_cur)), as_column(process.s(t_next))
    nu_cur, nu_next = as_column(process.nsr(t_cur)), as_column(process.nsr(t_next))
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


# Below this ratio r = h_prev / h of consecutive steps in log nu, DPM-Solver++(2M) takes its first-order
# step: its correction (1/(2r)) (D - D_prev) would multiply the rounding of D by 1/(2r).
MIN_STEP_RATIO = 1e-6


def dpmpp_2m_step(score, process, x, t_cur, t_next, rng, carry=None):
    """DPM-Solver++(2M) (Lu et al. 2022), as k-diffusion's ``sample_dpmpp_2m``: a multistep step. 1 NFE.

    In ``y = x / s``, ``h = log(nu / nu')``, with the denoiser ``D``: ``y' = (nu'/nu) y - expm1(-h) D_d``,
    ``D_d = D`` on the first step (``carry`` None: DDIM) and otherwise
    ``D_d = (1 + 1/(2r)) D - (1/(2r)) D_prev``, ``r = h_prev / h`` from ``carry = (D_prev, t_prev)``.
    A step between two levels equal to rounding (``|h| < 1e-12``, every row) is skipped: ``x`` and the
    carried state pass through unchanged (0 NFE). Elsewhere, where ``r < MIN_STEP_RATIO`` the step is
    first order. Returns ``(x', 1, (D, t_cur))``."""
    s_cur, s_next = as_column(process.s(t_cur)), as_column(process.s(t_next))
    nu_cur, nu_next = as_column(process.nsr(t_cur)), as_column(process.nsr(t_next))
    h = anp.log(nu_cur) - anp.log(nu_next)
    if carry is not None and np.all(np.abs(getval(h)) < 1e-12):     # levels equal to rounding: no step
        return x, 0, carry
    denoised = tweedie_denoise(score, process, x, t_cur)
    drift = denoised
    if carry is not None:
        previous, t_prev = carry
        r = (anp.log(as_column(process.nsr(t_prev))) - anp.log(nu_cur)) / h
        safe = anp.where(r < MIN_STEP_RATIO, 1.0, r)
        drift = anp.where(r < MIN_STEP_RATIO, denoised, (1.0 + 0.5 / safe) * denoised - (0.5 / safe) * previous)
    return s_next * ((nu_next / nu_cur) * x / s_cur - anp.expm1(-h) * drift), 1, (denoised, t_cur)


heun_step.order, dpmpp_2m_step.order, dpmpp_2m_step.multistep = 2, 2, True

# Every step by name: Part I's (``PREDICTORS``) and these two. This part's functions, and its ``sample``, resolve
# names here; Part I's ``sample`` takes these steps as functions.
ALL_PREDICTORS = {**PREDICTORS, "heun": heun_step, "dpmpp_2m": dpmpp_2m_step}


def resolve_step(step, name="step"):
    """A step by a name of :data:`ALL_PREDICTORS`, or a callable whose signature is checked against the step
    contract. A ``functools.partial`` of a step keeps the step's ``multistep`` and ``order`` marks.

    >>> resolve_step("heun") is heun_step
    True
    """
    predictor = resolve_predictor(step, name, ALL_PREDICTORS)
    if isinstance(predictor, partial):
        for mark in ("multistep", "order"):
            if hasattr(predictor.func, mark) and not hasattr(predictor, mark):
                setattr(predictor, mark, getattr(predictor.func, mark))
    arguments = (None,) * (7 if getattr(predictor, "multistep", False) else 6)
    try:
        inspect.signature(predictor).bind(*arguments)
    except TypeError as err:
        raise TypeError(f"`{name}` {_name(predictor)} does not take the step's arguments (score, process, x, "
                        f"t_cur, t_next, rng{', carry' if len(arguments) == 7 else ''}): {err}") from None
    except ValueError:    # no signature to inspect (a builtin): checked at its first call
        pass
    return predictor

_paper_sample = sample


@wraps(_paper_sample)
def sample(score, process, ts, x_T, rng, *, predictor="euler", **options):
    score = guest_score(score, batch_size=options.pop("batch_size", None), process=check_process(process))
    check_bool(options.get("denoise", False), "denoise")
    return _paper_sample(score, process, ts, x_T, rng, predictor=resolve_step(predictor, "predictor"),
                         **options)


sample.__doc__ = _paper_sample.__doc__ + """
    Part II: ``predictor`` may also be a name of ``ALL_PREDICTORS`` (``"heun"``, ``"dpmpp_2m"``).
    """


# -- The exact output law for Gaussian data (docs/derivations.md, 6) -------------

class _Noise:
    """Stands in for ``rng`` in the exact evaluations: ``"count"`` returns zeros and counts the draws,
    ``"probe"`` makes draw ``k`` 1 on row ``2 + k``, ``"none"`` refuses a step that draws (naming ``where``)."""

    def __init__(self, mode, where=""):
        self.mode, self.where, self.calls = mode, where, 0

    def standard_normal(self, shape):
        if self.mode == "none":
            raise ValueError(f"the step draws noise: {self.where or 'this evaluation'} needs a deterministic step")
        out = np.zeros(shape)
        if self.mode == "probe":
            out[2 + self.calls] = 1.0
        self.calls += 1
        return out

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise TypeError(f"the step called rng.{attr}; a step draws its noise only as rng.standard_normal(x.shape) "
                        "(the step contract), which the exact evaluations replace")


class GaussianLaw(NamedTuple):
    """Mean and variance per coordinate of a Gaussian law, each (d,)."""
    mean: np.ndarray
    var: np.ndarray


def gaussian_output_law(target, process, ts, *, predictor="euler", corrector_steps=0, corrector_ratio=0.1,
                        denoise=False, start=None):
    """Exact law of :func:`sample`'s output for Gaussian data with its exact score (derived).

    With a diagonal Gaussian target every step is ``x' = A x + b + c xi`` per coordinate, so the sampler
    is ``x_out = A x_T + b + sum_k c_k xi_k``. The coefficients are read off :func:`sample`'s own loop run
    on a probe batch (rows ``x_T = 0``, ``x_T = 1``, then one per noise draw), so this is the law of the
    implemented sampler (docs/derivations.md, 6); the draws are counted by a first run on two rows.
    ``start``: ``(mean, var)`` of ``x_T`` per coordinate (default: :func:`prior_sample`'s law).

    >>> import models, scoreopt as so
    >>> law = gaussian_output_law(models.Gaussian([0.0], [0.25]), so.ve(), so.edm_schedule(so.ve(), 50))
    >>> round(float(law.var[0]), 3)                                        # Euler, T = 50: 0.25 as T grows
    0.223
    """
    ts, law = _gaussian_law(target, process, ts, predictor, corrector_steps, corrector_ratio,
                            check_bool(denoise, "denoise"), start)
    return GaussianLaw(*law(ts))


def _gaussian_law(target, process, ts, predictor, corrector_steps, corrector_ratio, denoise, start):
    """Check once; returns the checked ``ts`` and ``law(ts) -> (mean, var)``, differentiable in ``ts``."""
    if len(getattr(target, "weights", ())) != 1:
        raise ValueError("`target` must be a Gaussian (one component) for an exact law")
    process = check_process(process)
    ts, score = check_schedule(ts, process), _TargetScore(target, process)
    predict = _sampler_iv(score, resolve_step(predictor, "predictor"), corrector_steps, corrector_ratio)
    d = target.dim
    mean_T, var_T = (np.zeros(d), prior_variance(process, target.variance())) if start is None else start
    def run(ts, x, noise, check):
        step, after = checked_steps(predict, ts, x) if check else (predict, None)
        return _sample_loop(checked_score(score) if check else score, process, ts, x, noise, step, corrector_steps,
                            corrector_ratio, denoise, after)[0]
    counter = _Noise("count")
    run(ts, np.zeros((2, d)), counter, True)     # also checks that the scores are finite
    probe = np.zeros((2 + counter.calls, d))
    probe[1] = 1.0

    def law(ts):
        out = run(ts, probe, _Noise("probe"), False)
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
    """``KL(N(mean, diag var) || N(target_mean, diag target_var))``, with ``log1p`` so that a KL near 0 keeps
    its relative precision: ``0.5 sum_k [u_k - log(1 + u_k) + (mean_k - m_k)^2 / lam_k]``, ``u = var/lam - 1``.

    >>> round(float(gaussian_kl(np.zeros(1), np.full(1, 2.0), np.zeros(1), np.ones(1))), 4)   # (2 - 1 - log 2) / 2
    0.1534
    """
    arrays = [as_real_array(a, name) for a, name in ((mean, "mean"), (var, "var"), (target_mean, "target_mean"),
                                                     (target_var, "target_var"))]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("`mean`, `var`, `target_mean` and `target_var` must have one shape")
    if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(arrays[1] <= 0) or np.any(arrays[3] <= 0):
        raise ValueError("the means must be finite and the variances `var`, `target_var` finite and positive")
    return float(_kl(*arrays))


def _kl(mean, var, m, lam):
    u = var / lam - 1.0
    return 0.5 * anp.sum(u - anp.log1p(u) + (mean - m) ** 2 / lam)


def gaussian_schedule_kl(target, process, ts, *, predictor="euler", corrector_steps=0, corrector_ratio=0.1):
    """Exact ``KL(sampler output || p_{t_min})`` for Gaussian data with its exact score (derived)."""
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

    Tracks ``log|dx_out/dx_T|`` along the trajectory, differentiating each step map with autograd, so
    ``log p_out(x_out) = log p_T(x_T) - log|dx_out/dx_T|``; with ``x_T ~ p_T``,
    ``mean(log p_out(x_out) - log p_0(x_out))`` estimates ``KL(p_out || p_0)`` with no density
    estimate. ``score`` must be autograd-differentiable in ``x``. A step that folds the line (slope
    <= 0 at a sample) is named; a step that draws noise or carries a state is refused.

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> x_T = prior_sample(p, 3, [0.25], 0)
    >>> out = flow_log_density(lambda x, t: target.score(x, t, p), p, so.edm_schedule(p, 20), x_T,
    ...                        lambda x: -0.5 * np.sum(x ** 2, axis=1) / 6400.25 - 0.5 * np.log(2 * np.pi * 6400.25))
    >>> out.x.shape, out.log_density.shape
    ((3, 1), (3,))
    """
    step = resolve_step(predictor, "predictor")
    if getattr(step, "multistep", False):
        raise ValueError("`predictor` carries a state from step to step; the change of variables here follows "
                         "one-step maps")
    if step is ancestral_step or step is euler_maruyama_step:
        raise ValueError(f"`predictor` {predictor!r} draws noise; the change of variables (flow_log_density) needs "
                         "a deterministic step such as 'euler' or 'heun'")
    process = check_process(process)
    ts, x = check_schedule(ts, process), check_data(x_T, "x_T")
    check_callable(log_prob_T, "log_prob_T", "log_prob_T(x)")
    if x.shape[1] != 1:
        raise ValueError("`x_T` must have one column: the flow density is for 1-D data")
    checked = guest_score(score, process=process)
    noise = _Noise("none", "`predictor` of flow_log_density (the change of variables)")
    log_density = np.asarray(log_prob_T(x), dtype=float).reshape(-1)
    for t_cur, t_next in zip(ts[:0:-1], ts[-2::-1]):
        slope = elementwise_grad(lambda y: anp.sum(step(checked.score, process, y, t_cur, t_next, noise)[0]))(x)[:, 0]
        if np.any(slope <= 0):
            raise ValueError(f"the step {_name(step)} from t = {t_cur:.6g} to t = {t_next:.6g} folds the line (slope "
                             "<= 0 at some samples): the change of variables does not apply; use smaller steps")
        x, log_density = step(checked, process, x, t_cur, t_next, noise)[0], log_density - np.log(slope)
    return FlowDensity(x, log_density)


# -- The KL-optimal schedule for Gaussian data: the limit (docs/derivations.md, 7) --

def _softmax_schedule(z, t_min, t_max):
    """A valid schedule from any real vector ``z``: increments ``softmax(z)`` of the range, floored at 1e-9 of
    it (no two times coincide, even in a line search); ``z = log(diff(ts))`` gives back ``ts`` to 1e-9."""
    w = anp.exp(z - anp.max(z))
    w = (1.0 - 1e-9 * len(z)) * w / anp.sum(w) + 1e-9
    return anp.concatenate([anp.array([t_min]), t_min + (t_max - t_min) * anp.cumsum(w)[:-1], anp.array([t_max])])


def _minimise_schedule(objective, candidates, process, n_refine, max_iter, check=None):
    """L-BFGS on ``objective(ts)`` over softmax increments from the ``n_refine`` best of ``candidates`` (each
    scored by ``check(ts)`` if given, else ``objective``): the best schedule seen, never worse than a start.
    A start whose value is not finite is named. Returns ``(ts, value, values of the candidates)``."""
    lo, hi = process.t_min, process.t_max
    value_grad = value_and_grad(lambda z: objective(_softmax_schedule(z, lo, hi)))
    scored = {name: float((check or objective)(ts)) for name, ts in candidates.items()}
    bad = [name for name, value in scored.items() if not np.isfinite(value)]
    if bad:
        raise ValueError(f"the objective is not finite on the starting schedule {bad[0]!r}: the score returned "
                         "non-finite values on its path")
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
    """The KL-optimal ``T``-step schedule of a sampler for Gaussian data: the limit no rule can beat (derived).

    Minimises ``log KL(output || p_{t_min})`` of :func:`gaussian_output_law` over the interior times
    (softmax increments of ``t``, autograd through the sampler's own loop, L-BFGS) from the ``n_refine``
    best of every baseline (arctan with the data's root mean variance) and ``starts``; never worse than
    a start (docs/derivations.md, 7). For ``"euler_maruyama"``, and ``"dpmpp_2m"`` in one dimension,
    the optimiser cancels per-step errors of opposite signs: no yardstick there.

    >>> import models, scoreopt as so
    >>> ts = gaussian_optimal_schedule(models.Gaussian([0.0], [0.25]), so.ve(), 2)
    >>> len(ts), float(ts[0]), float(ts[-1])
    (3, 0.0, 1.0)
    """
    process = check_process(process)
    T, n_refine = check_int(T, "T", 1), check_int(n_refine, "n_refine", 1)
    candidates = _starting_schedules(process, T, float(np.sqrt(np.mean(target.variance()))), starts)
    _, law = _gaussian_law(target, process, candidates["uniform"], predictor, corrector_steps, corrector_ratio,
                           False, None)
    goal = target.marginal(process, process.t_min)
    objective = lambda ts: anp.log(_kl(*law(ts), goal.mean(), goal.variance()) + 1e-300)
    return _minimise_schedule(objective, candidates, process, n_refine, check_int(max_iter, "max_iter", 1))[0]


# -- The local error against the model's own flow: the schedule for a trained model (docs/derivations.md, 9) --

class FlowWeight(NamedTuple):
    """The propagation weight of :func:`flow_error_cost`, prepared once from the data (:func:`flow_weight`):
    the data covariance's top ``k`` eigenpairs and the mean variance of the other ``d - k`` directions."""
    kind: str                 # "data" (sample quality) or "kl" (the output's KL)
    basis: np.ndarray         # (d, k) orthonormal eigenvectors; k = d (exact), 0 ("scalar") or between
    variances: np.ndarray     # their eigenvalues (k,)
    rest: float               # mean variance of the d - k directions outside the basis (0 when k = d)

    @property
    def scale(self):
        """The data's root mean variance."""
        d = len(self.basis)
        return float(np.sqrt((np.sum(self.variances) + (d - len(self.variances)) * self.rest) / d))


FULL_RANK_MAX = 1024   # up to this d, flow_weight takes every eigenpair (O(d^3)); above, the top LOW_RANK
LOW_RANK = 64


def flow_weight(x0, kind="data", rank=None, rng=0):
    """The propagation weight of :func:`flow_error_cost` for data ``x0`` (derived, docs/derivations.md, 9.1).

    ``kind``: ``"data"`` (the squared gain of the exact flow from ``t'`` to ``t_min`` for Gaussian data with
    ``x0``'s covariance: for sample quality), ``"kl"`` (the same whitened: for the output's KL) or
    ``"scalar"`` (every eigenvalue replaced by the mean variance). ``rank``: how many eigenpairs of the
    covariance to keep; the other ``d - k`` directions share their mean variance (a low-rank-plus-isotropic
    covariance). Default: all of them (``O(n d^2 + d^3)``) up to ``d = FULL_RANK_MAX``, else the top
    ``LOW_RANK`` by randomised subspace iteration (``rng``), ``O(n d k)`` time and ``O(d k)`` memory.

    >>> w = flow_weight(np.random.default_rng(0).standard_normal((100, 3)))
    >>> w.kind
    'data'
    """
    x0 = check_data_range(check_data(x0, min_rows=2))
    if not (isinstance(kind, str) and kind in ("data", "kl", "scalar")):
        raise ValueError(f"`weight` must be 'data', 'kl', 'scalar' or a FlowWeight, got {kind!r}")
    n, d = x0.shape
    if kind == "scalar":
        k = 0
    else:
        k = (d if d <= FULL_RANK_MAX else LOW_RANK) if rank is None else check_int(rank, "rank", 0)
    k, total = min(k, d), float(np.sum(x0.var(axis=0, ddof=1)))
    if k == d:
        lam, U = np.linalg.eigh(np.atleast_2d(np.cov(x0.T)))
    elif k == 0:
        lam, U = np.zeros(0), np.zeros((d, 0))
    else:
        lam, U = _top_eigenpairs(x0 - x0.mean(axis=0), k, as_rng(rng))
    lam = np.maximum(lam, 0.0)
    rest = max(total - float(lam.sum()), 0.0) / (d - k) if k < d else 0.0
    return FlowWeight("kl" if kind == "kl" else "data", U, lam, rest)


def as_flow_weight(weight, x0):
    """``weight`` for data ``x0`` (checked): a name of :func:`flow_weight`, or a :class:`FlowWeight` whose
    ``kind`` is "data" or "kl", ``basis`` a (d, k) orthonormal float array, ``variances`` k finite values
    >= 0 and ``rest`` a finite value >= 0; each error names the field."""
    if not isinstance(weight, FlowWeight):
        return flow_weight(x0, weight)
    d = x0.shape[1]
    if not (isinstance(weight.kind, str) and weight.kind in ("data", "kl")):
        raise ValueError(f"`weight.kind` must be 'data' or 'kl', got {weight.kind!r}")
    basis = as_real_array(weight.basis, "weight.basis")
    if basis.ndim != 2 or basis.shape[0] != d or basis.shape[1] > d or not np.all(np.isfinite(basis)):
        raise ValueError(f"`weight.basis` must be a finite (d, k) array with d = {d} (the data's) and k <= d, got "
                         f"shape {basis.shape}")
    if not np.allclose(basis.T @ basis, np.eye(basis.shape[1]), rtol=0, atol=1e-6):
        raise ValueError("`weight.basis` must be orthonormal (its columns unit vectors at right angles)")
    variances = as_real_array(weight.variances, "weight.variances")
    if variances.shape != (basis.shape[1],) or not np.all(np.isfinite(variances)) or np.any(variances < 0):
        raise ValueError(f"`weight.variances` must be {basis.shape[1]} finite values >= 0 (one per column of "
                         f"`weight.basis`), got {variances!r}")
    rest = check_real(weight.rest, "weight.rest")
    if not rest >= 0:
        raise ValueError(f"`weight.rest` must be a finite value >= 0, got {rest}")
    return FlowWeight(weight.kind, basis, variances, rest)


def _top_eigenpairs(xc, k, rng, n_iter=4, oversample=10):
    """Top ``k`` eigenpairs of the covariance of centred data ``xc`` (n, d) by randomised subspace iteration
    (Halko, Martinsson & Tropp 2011), never forming the ``d x d`` matrix."""
    Q = np.linalg.qr(xc.T @ (xc @ rng.standard_normal((xc.shape[1], k + oversample))))[0]
    for _ in range(n_iter):
        Q = np.linalg.qr(xc.T @ (xc @ Q))[0]
    lam, V = np.linalg.eigh((xc @ Q).T @ (xc @ Q) / (len(xc) - 1))
    return lam[::-1][:k], (Q @ V)[:, ::-1][:, :k]


def _weight_coordinates(weight, delta):
    """``delta`` (m, d) in the weight's basis: ``(m, k)`` coordinates, and the squared norm (m,) of what lies
    outside the basis."""
    coords = delta @ weight.basis
    return coords, np.maximum(np.sum(delta ** 2, axis=1) - np.sum(coords ** 2, axis=1), 0.0)


def _gain2(weight, process, lam, t_next):
    """The weight ``w(lambda)`` at ``t'``: the squared gain of the exact flow to ``t_min``, whitened for "kl"."""
    s0, sigma0 = float(process.s(process.t_min)), float(process.sigma(process.t_min))
    A0 = s0 ** 2 * lam + sigma0 ** 2
    A1 = as_column(process.s(t_next)) ** 2 * lam + as_column(process.sigma(t_next)) ** 2
    return A0 / A1 / (A0 if weight.kind == "kl" else 1.0)


def _weighted_error(weight, process, delta, t_next):
    """Per row ``(1/d) sum_k w_k(t') (U^T delta)_k^2``, the directions outside the basis weighted by their
    mean variance (docs/derivations.md, 9)."""
    coords, outside = _weight_coordinates(weight, delta)
    inside = np.sum(_gain2(weight, process, weight.variances[None, :], t_next) * coords ** 2, axis=1)
    return (inside + _gain2(weight, process, weight.rest, t_next)[..., 0] * outside) / delta.shape[1]


def flow_error_cost(score, process, t_cur, t_next, x0, rng, *, step="euler", weight="data", n_substeps=2):
    """Local error of the sampler's step against the model's own flow (derived, docs/derivations.md, 9).

    For a deterministic step ``Phi`` from ``t`` to ``t' < t``, with ``x = s(t) x0 + sigma(t) eps`` (one
    ``eps`` for every interval), ``delta = Phi(x) - Phi_K(x)`` where ``Phi_K`` is ``n_substeps`` Heun
    substeps of the same score spaced in ``asinh(nu / c)``, and

        L(t, t') = (1 / (n d)) sum_rows sum_k w_k(t') (U^T delta)_k^2,

    ``w`` the propagation weight (:func:`flow_weight`). The model's error cancels in ``delta``. For the
    ancestral step the cost is its error in law, the posterior covariance its output lacks,
    ``(1 - r)^2 nu^2 E[dD/dy]``, from the model's own Jacobian (needs ``n >= 4`` rows); DPM-Solver++(2M)
    starts each interval with the state it would carry there on the model's flow; other stochastic steps
    are refused. All intervals go through one score call per stage (one time per row: ``score`` must take
    per-row times; ``scoreopt.rowwise_score`` adapts one that does not). Returns an ``Estimate`` of the
    shape of ``t_cur``, the standard error over rows.

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> score, x0 = lambda x, t: target.score(x, t, p), target.sample(500, 0)
    >>> bool(flow_error_cost(score, p, 0.6, 0.55, x0, 0).value < flow_error_cost(score, p, 0.6, 0.5, x0, 0).value)
    True
    """
    process = check_process(process)
    t_cur, t_next = check_step_times(t_cur, t_next, process)
    if np.any(t_next >= t_cur):
        raise ValueError("`t_next` must be below `t_cur` (a step goes from the noisier time towards the data), "
                         f"got t_cur = {t_cur}, t_next = {t_next}")
    score, x0, rng = guest_score(score, process=process), check_data(x0, min_rows=2), as_rng(rng)
    step = resolve_step(step)
    weight = as_flow_weight(weight, x0)
    if step is ancestral_step and len(x0) < 4:
        raise ValueError(f"`x0` (n_samples) needs at least 4 rows for the ancestral step's error in law, got {len(x0)}")
    return _flow_error(score, process, t_cur, t_next, x0, rng, step, weight, check_int(n_substeps, "n_substeps", 1))


def _flow_error(score, process, t_cur, t_next, x0, rng, step, weight, K):
    shape, t, t2 = np.shape(t_cur), np.ravel(t_cur), np.ravel(t_next)
    T, n = len(t), len(x0)
    eps = rng.standard_normal(x0.shape)
    rows_t, rows_t2 = np.repeat(t, n), np.repeat(t2, n)
    x = as_column(process.s(rows_t)) * np.tile(x0, (T, 1)) + as_column(process.sigma(rows_t)) * np.tile(eps, (T, 1))
    if step is ancestral_step:
        value, stderr = _ancestral_weak_error(score, process, x, rows_t, rows_t2, n, weight, rng)
    else:
        if getattr(step, "multistep", False):
            coarse = _multistep_coarse(step, score, process, x, rows_t, rows_t2,
                                       *_carry_from_flow(score, process, x, t, t2, n, K, weight.scale))
        else:
            coarse = _deterministic(step, score, process, x, rows_t, rows_t2, None)
        fine = _heun_substeps(score, process, x, rows_t, rows_t2, K, weight.scale)
        value, stderr = mean_stderr(_weighted_error(weight, process, coarse - fine, rows_t2).reshape(T, n))
    return Estimate(float(value[0]), float(stderr[0])) if shape == () else Estimate(value.reshape(shape),
                                                                                    stderr.reshape(shape))


def _substep_times(process, t, t2, K, c):
    """``K + 1`` times from ``t`` down to ``t2`` (rows of (K + 1, m)), the ends exact, equally spaced in
    ``asinh(nu / c)``: linear in ``nu`` below the data's scale ``c``, logarithmic above (derivations, 9.2)."""
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
    """The ancestral step's local error in law per interval: its output lacks ``(1 - r)^2 E[Cov(x0 | y)]``,
    ``Cov(x0 | y) = nu^2 dD/dy`` (Tweedie), for any data (docs/derivations.md, 9.3). The diagonal of
    ``dD/dy`` in the weight's basis (and its mean outside it) comes from one finite difference per row
    along a Rademacher direction (Hutchinson); the cost is the weighted square of its mean, with a
    jackknife error over ``n_groups`` row groups. Weight: ``g^4`` ("data": the squared error of the
    final second moment) or ``g^4 / (lam + nu0^2)^2`` ("kl": relative to the final variance)."""
    s, nu, nu2 = as_column(process.s(t)), as_column(process.nsr(t)), as_column(process.nsr(t2))
    (m, d), k = x.shape, len(weight.variances)
    z = rng.choice([-1.0, 1.0], size=(m, k))
    xi = rng.choice([-1.0, 1.0], size=(m, d)) if k < d else np.zeros((m, d))
    outside = xi - (xi @ weight.basis) @ weight.basis.T                        # Rademacher, projected out of the basis
    v = z @ weight.basis.T + outside
    h = 1e-4 * np.sqrt(weight.scale ** 2 + nu ** 2)
    y = x / s
    Jv = (tweedie_denoise(score, process, s * (y + h * v), t) - tweedie_denoise(score, process, x, t)) / h
    diagonal = z * (Jv @ weight.basis)                                          # diag(U^T J U), unbiased
    if k < d:                                                                   # mean diagonal outside the basis
        diagonal = np.hstack([diagonal, np.sum(outside * Jv, axis=1, keepdims=True) / (d - k)])
    lam = np.append(weight.variances, weight.rest)[: diagonal.shape[1]][None, :]
    deficit = (1.0 - (nu2 / nu) ** 2) ** 2 * nu ** 2 * diagonal               # second-moment deficit
    nu0 = float(process.nsr(process.t_min))
    w = ((lam + nu0 ** 2) / (lam + nu2 ** 2)) ** 4 / ((lam + nu0 ** 2) ** 2 if weight.kind == "kl" else 1.0)
    multiplicity = np.append(np.ones(k), d - k)[: diagonal.shape[1]]
    values = np.sqrt(w * multiplicity / d) * deficit
    out = [_squared_mean(np.array([g.mean(axis=0) for g in np.array_split(rows, n_groups)]))
           for rows in values.reshape(-1, n, values.shape[1])]
    return Estimate(*(np.array(c) for c in zip(*out)))


def _squared_mean(M):
    """``||E m||^2`` from group means ``M`` (G, k): the square of the overall mean (positive: an interval
    whose signal is below the noise never looks free, docs/derivations.md, 9.3), and its jackknife
    standard error over the groups."""
    G = len(M)
    value = float(np.sum(M.mean(axis=0) ** 2))
    leave_out = np.sum(((M.sum(axis=0)[None, :] - M) / (G - 1)) ** 2, axis=1)
    return Estimate(value, float(np.sqrt((G - 1) / G * np.sum((leave_out - leave_out.mean()) ** 2))))


def _deterministic(step, score, process, x, t, t2, carry, where="the local error against the model's flow"):
    """The step on per-row times with no noise source: a stochastic step is refused, naming ``where``."""
    noise = _Noise("none", where)
    if step not in ALL_PREDICTORS.values():                    # a step of the user's gets a copy: the caller reuses x
        x = x.copy()
    if getattr(step, "multistep", False):
        return _step_output(step(score, process, x, t, t2, noise, carry), x.shape, step, 3)[0]
    return _step_output(step(score, process, x, t, t2, noise), x.shape, step, 2)[0]


def _carry_from_flow(score, process, x, t, t2, n, K, c):
    """The state a multistep step carries into each interval: the denoiser at the previous (noisier) level
    of the schedule on the model's flow through ``x`` (``K`` Heun substeps up). Intervals are consecutive
    when ``t2[i + 1] == t[i]``; the top one starts without a state, as sampling does. Returns ``(rows,
    carry)``, the rows that have a state and ``(D_prev, t_prev)`` for them."""
    has_prev = np.zeros(len(t), dtype=bool)
    has_prev[:-1] = t2[1:] == t[:-1]
    rows = np.repeat(has_prev, n)
    if not np.any(rows):
        return rows, None
    t_here, t_prev = np.repeat(t, n)[rows], np.repeat(np.append(t[1:], t[-1]), n)[rows]
    up = _heun_substeps(score, process, x[rows], t_here, t_prev, K, c)
    return rows, (tweedie_denoise(score, process, up, t_prev), t_prev)


def _multistep_coarse(step, score, process, x, t, t2, rows, carry):
    """A multistep step on per-row times: with its state on ``rows``, first order elsewhere."""
    out = np.empty_like(x)
    if np.any(rows):
        out[rows] = _deterministic(step, score, process, x[rows], t[rows], t2[rows], carry)
    if not np.all(rows):
        out[~rows] = _deterministic(step, score, process, x[~rows], t[~rows], t2[~rows], None)
    return out


def equal_error_schedule(score, process, T, x0, rng, *, step="euler", weight="data", n_samples=32, max_iter=15,
                         budget=None, batch_size=None, callback=None):
    """The schedule for your model and sampler: equal local error against the model's own flow (derived).

    Equalises :func:`flow_error_cost` of ``step`` over the ``T`` steps by the damped Algorithm 1 fixed
    point (``scoreopt.equal_cost_schedule``): update order ``2 (p + 1)`` for a step of order ``p``, from
    the log-linear schedule, until no time moves by more than 1e-2 of its local step (fixed points from
    different seeds differ by 0.06-0.4 local steps: docs/derivations.md, 3), at most
    ``max_iter`` updates (a result that did not converge is warned of). The costs use ``n_samples``
    rows of ``x0`` (drawn with ``rng``) and one noise draw for every interval and update; the weight
    (:func:`flow_weight`, or a :class:`FlowWeight`) is prepared once from all of ``x0``
    (docs/derivations.md, 9). ``budget``: at most this many per-sample score evaluations (fewer
    updates). ``batch_size``, ``callback``: as ``scoreopt.equal_cost_schedule``. Returns a
    ``scoreopt.EqualCostResult`` (``n_evaluations`` the rows passed to the score).

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> r = equal_error_schedule(lambda x, t: target.score(x, t, p), p, 4, target.sample(500, 0), 0, step="heun")
    >>> len(r.ts), float(r.ts[0]), float(r.ts[-1])
    (5, 0.0, 1.0)
    """
    process = check_process(process)
    step, T = resolve_step(step), check_int(T, "T", 1)
    x0, rng = check_data_range(check_data(x0, min_rows=2)), as_rng(rng)
    check_data_scale(np.mean(x0 ** 2, axis=0), process)
    weight = as_flow_weight(weight, x0)
    points = x0[rng.choice(len(x0), min(check_int(n_samples, "n_samples", 2), len(x0)), replace=False)]
    if budget is not None:
        callback = stop_at_budget(budget, callback)
    return equal_cost_schedule(score, process, loglinear_schedule(process, T), points, rng, cost=flow_error_cost,
                               step=step, weight=weight, order=2 * (getattr(step, "order", 1) + 1), max_iter=max_iter,
                               tol=1e-2, batch_size=batch_size, callback=callback)


# -- Teacher-trajectory dynamic programming (GITS) and the coupled-error oracle (docs/derivations.md, 9.5-9.6) --

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
    """Teacher-trajectory dynamic programming (GITS, Chen et al., ICML 2024) with this project's weight.

    ``n_draws`` prior draws are solved on ``n_cells`` cells uniform in ``log nu`` by the model
    (``n_substeps`` Heun substeps a cell): the teacher. ``c(i, j)`` is the weighted squared error of one
    sampler step from the teacher at node ``i`` to node ``j`` against the teacher at ``j`` (the weight of
    :func:`flow_error_cost`); exact dynamic programming finds the cheapest ``T``-step path. Deterministic
    one-step samplers. Evaluations: ``n_draws (2 K G + G)``, plus ``n_draws G (G + 1) / 2`` for Heun.

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> r = teacher_schedule(lambda x, t: target.score(x, t, p), p, 4, target.sample(200, 0), 0, n_draws=8, n_cells=30)
    >>> len(r.ts), float(r.ts[0]) == p.t_min, float(r.ts[-1]) == p.t_max
    (5, True, True)
    """
    process, T = check_process(process), check_int(T, "T", 1)
    score = guest_score(score, batch_size=batch_size, process=process)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    step = _one_step(step, "teacher_schedule")
    G, K = check_int(n_cells, "n_cells", T), check_int(n_substeps, "n_substeps", 1)
    weight = as_flow_weight(weight, x0)
    x = prior_sample(process, check_int(n_draws, "n_draws", 2), x0.var(axis=0), rng)
    nu_min, nu_max = nsr_range(process)
    nodes = time_from_nsr(process, np.geomspace(nu_max, nu_min, G + 1))
    nodes[0], nodes[-1] = process.t_max, process.t_min
    m, teacher = len(x), [x]
    for j in range(G):                                             # the teacher's trajectory
        teacher.append(_heun_substeps(score, process, teacher[-1], np.full(m, nodes[j]), np.full(m, nodes[j + 1]), K,
                                      weight.scale))
    C = np.full((G + 1, G + 1), np.inf)
    for i in range(G):                                             # one step from node i to every j > i
        ends = nodes[i + 1:]
        tiled = np.tile(teacher[i], (len(ends), 1))
        shared = _SharedFirstStage(score, tiled, nodes[i], np.tile(score(teacher[i], nodes[i]), (len(ends), 1)))
        y = _deterministic(step, shared, process, tiled, nodes[i], np.repeat(ends, m), None, "teacher_schedule")
        errors = _weighted_error(weight, process, y - np.concatenate(teacher[i + 1:]), np.repeat(ends, m))
        C[i, i + 1:] = errors.reshape(len(ends), m).mean(axis=1)
    path, total = _cheapest_path(C, T)
    return TeacherSchedule(nodes[path][::-1].copy(), total, C, nodes, path, score.evaluations)


class _SharedFirstStage:
    """``score``, except on the tiled batch at the step's starting time: every step from one node to many
    begins with the same evaluation, made once (the caller's ``value``)."""

    def __init__(self, score, x, t, value):
        self.score, self.x, self.t, self.value = score, x, t, value

    def __call__(self, x, t):
        return self.value if x is self.x and np.ndim(t) == 0 and t == self.t else self.score(x, t)


def _cheapest_path(C, T):
    """Exact dynamic programming: the path ``0 = n_0 < ... < n_T = G`` minimising ``sum_k C[n_{k-1}, n_k]``."""
    G = len(C) - 1
    best, back = np.full(G + 1, np.inf), np.zeros((T + 1, G + 1), dtype=int)
    best[0] = 0.0
    for k in range(1, T + 1):
        total = best[:, None] + C                 # (from, to)
        back[k] = np.argmin(total, axis=0)
        best = total[back[k], np.arange(G + 1)]
    path = [G]
    for k in range(T, 0, -1):
        path.append(back[k][path[-1]])
    return np.array(path[::-1]), float(best[G])


def _one_step(step, where):
    step = resolve_step(step)
    if getattr(step, "multistep", False):
        raise ValueError(f"`step` carries a state from step to step; {where} takes one-step samplers")
    if step is ancestral_step or step is euler_maruyama_step:
        raise ValueError(f"`step` must be deterministic for {where}: it compares one trajectory with another")
    return step


def coupled_error(score, process, ts, x_T, reference, *, step="euler"):
    """Mean squared distance, per coordinate, of the ``T``-step sample on ``ts`` from the prior draws ``x_T``
    to ``reference``, the model's own fine solution from the same draws (deterministic steps)."""
    process = check_process(process)
    ts, x_T, reference = check_schedule(ts, process), check_data(x_T, "x_T"), check_data(reference, "reference")
    if reference.shape != x_T.shape:
        raise ValueError(f"`reference` must have the shape of `x_T`, {x_T.shape}")
    step = _one_step(step, "coupled_error")
    step, after = checked_steps(step, ts, x_T)
    x = _sample_loop(guest_score(score, process=process), process, ts, x_T, _Noise("none", "coupled_error"), step,
                     0, 0.1, False, after)[0]
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

    Minimises :func:`coupled_error` (to the model's own ``reference_steps``-step log-linear Heun solution
    from the same ``n_draws`` prior draws) over the interior times: softmax increments, autograd through
    the sampler's loop and the score, L-BFGS, from the ``n_refine`` best of the baselines and
    ``starts``; never worse than a start. The score must be autograd-differentiable in ``x`` and ``t``
    (written with ``autograd.numpy``; a PyTorch model behind NumPy is not) and take a float ``t``.
    Deterministic steps only. Every start's error is checked (a score that is not finite on a start's
    path is named). Returns an :class:`OracleSchedule`.

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> r = coupled_optimal_schedule(lambda x, t: target.score(x, t, p), p, 3, target.sample(200, 0), 0, n_draws=8,
    ...                              reference_steps=20, max_iter=3)
    >>> len(r.ts), bool(r.error <= min(r.start_errors.values()))
    (4, True)
    """
    process, T = check_process(process), check_int(T, "T", 1)
    checked = guest_score(score, process=process)
    x0, rng, step = check_data(x0, min_rows=2), as_rng(rng), _one_step(step, "coupled_optimal_schedule")
    counted = _CountingScore(checked.score)
    x_T = prior_sample(process, check_int(n_draws, "n_draws", 2), x0.var(axis=0), rng)
    fine = loglinear_schedule(process, check_int(reference_steps, "reference_steps", T))
    where = "`step` of coupled_optimal_schedule (it differentiates one trajectory)"
    reference = _sample_loop(checked_score(counted), process, fine, x_T, _Noise("none", where), heun_step, 0, 0.1,
                             False, checked_steps(heun_step, fine, x_T)[1])[0]
    candidates = _starting_schedules(process, T, float(np.sqrt(np.mean(x0.var(axis=0)))), starts)

    def run(ts, check=False):
        predict, after = checked_steps(step, ts, x_T) if check else (step, None)
        return _sample_loop(checked_score(counted) if check else counted, process, ts, x_T, _Noise("none", where),
                            predict, 0, 0.1, False, after)[0]
    objective = lambda ts: anp.log(anp.mean((run(ts) - reference) ** 2) + 1e-300)
    run(candidates["loglinear"], True)       # untraced and checked: an error here is the step's or the score's own
    try:
        value_and_grad(objective)(candidates["loglinear"])          # the first traced evaluation
    except Exception as err:
        raise TypeError(f"`score` must be differentiable by autograd in x and t (written with autograd.numpy) for "
                        f"coupled_optimal_schedule, which differentiates the sampler through it: "
                        f"{type(err).__name__}: {err}") from err
    ts, value, scored = _minimise_schedule(objective, candidates, process, check_int(n_refine, "n_refine", 1),
                                           check_int(max_iter, "max_iter", 1),
                                           check=lambda ts: np.log(np.mean((run(ts, True) - reference) ** 2) + 1e-300))
    return OracleSchedule(ts, float(np.exp(value)), {k: float(np.exp(v)) for k, v in scored.items()}, x_T,
                          reference, counted.evaluations)


class _CountingScore:
    """The raw score, counting the rows it is given (also while autograd traces it)."""

    def __init__(self, score):
        self.score, self.evaluations = score, 0

    def __call__(self, x, t):
        self.evaluations += len(x)
        return self.score(x, t)


# -- Schedules for n model calls, checked against the model's own solution (docs/derivations.md, 12) --

def levels_for_calls(n_calls, step="euler"):
    """How many noise levels a sampler visits with ``n_calls`` model calls, its last step going to
    ``sigma = 0`` (the denoised output), as k-diffusion and diffusers sample: ``n_calls`` for a one-call
    step (Euler/DDIM, DPM-Solver++(2M), the ancestral step); for Heun, k-diffusion's count, two calls a
    step between levels and one for the last step to 0, so ``n_calls = 2 n - 1`` must be odd.

    >>> levels_for_calls(10, "dpmpp_2m"), levels_for_calls(9, "heun")
    (10, 5)
    """
    step, n_calls = resolve_step(step), check_int(n_calls, "n_calls", 1)
    if step is not heun_step:
        return n_calls
    if n_calls % 2 == 0:
        raise ValueError(f"`n_calls` = {n_calls} is even: Heun makes 2 n - 1 calls on n levels (two a step, one for "
                         f"the last step to 0); ask for {n_calls - 1} or {n_calls + 1}")
    return (n_calls + 1) // 2


def sample_calls(score, process, ts, x_T, rng, *, step="euler", batch_size=None):
    """Sample as k-diffusion and diffusers do on the call levels ``ts`` (increasing, any subset of
    ``[t_min, t_max]``): the step between consecutive levels from ``ts[-1]`` down, then the last step to
    ``sigma = 0``, the denoised output ``D(x, ts[0])`` (Tweedie). Returns :class:`Sampled`; ``nfe`` is the
    model calls, ``len(ts)`` for a one-call step (``2 len(ts) - 1`` for Heun).

    >>> import scoreopt as so
    >>> process, score = so.ve(), lambda x, t: -x / (0.25 + so.ve().sigma(t) ** 2)    # N(0, 0.5^2) data
    >>> x_T = prior_sample(process, 4000, [0.25], rng=0)
    >>> x, nfe = sample_calls(score, process, so.edm_schedule(process, 10)[1:], x_T, rng=1)
    >>> round(float(x.std()), 2), nfe                   # 10 Euler calls: short of 0.5
    (0.38, 10)
    """
    process = check_process(process)
    ts, x = check_schedule(ts, process, endpoints=False, min_len=1), check_data(x_T, "x_T")
    step, after = checked_steps(resolve_step(step), ts, x)
    score = guest_score(score, batch_size=batch_size, process=process)
    return Sampled(*_calls_run(score, process, ts, x, step, as_rng(rng), after))


def _final_error(score, process, t, x0, rng, step, weight, K):
    """The local error of the last step, from ``t`` to ``sigma = 0``: the step gives the denoised output
    ``D(x, t)``; the model's flow is ``K`` Heun substeps to ``t_min`` and then ``D`` there. For the ancestral
    step, its error in law with ``t' = t_min``. In the data's scale (``s(t_min) x``)."""
    x = noised(process, x0, t, rng)
    rows_t, rows_end = np.full(len(x0), t), np.full(len(x0), process.t_min)
    if step is ancestral_step:
        value, stderr = _ancestral_weak_error(score, process, x, rows_t, rows_end, len(x0), weight, rng)
        return float(value[0]), float(stderr[0])
    coarse = tweedie_denoise(score, process, x, t)
    fine = tweedie_denoise(score, process, _heun_substeps(score, process, x, rows_t, rows_end, K, weight.scale),
                           process.t_min)
    value, stderr = mean_stderr(_weighted_error(weight, process, process.s(process.t_min) * (coarse - fine),
                                                rows_end)[None, :])
    return float(value[0]), float(stderr[0])


def _measured_gain(score, process, x0, rng, weight, n_levels=8, n_steps=6):
    """How much more the model's own flow amplifies an error than the Gaussian weight says, as a function of
    the level (derived, docs/derivations.md, 12): at ``n_levels`` levels uniform in ``log nu``, rows
    ``x = s x0 + sigma eps`` and ``x + h v`` (``v`` Rademacher) are carried to ``sigma = 0`` by ``n_steps``
    Heun steps (spaced as :func:`_substep_times`) and the denoiser at ``t_min``, once with the model and
    once with the exact score of Gaussian data of the weight's covariance; the correction is the ratio of
    their mean squared gains, so that the solver's own error cancels. Returns ``correction(t)``,
    interpolated in ``log nu`` (1 at ``t_min``, where the flow is the identity)."""
    nu_min, nu_max = nsr_range(process)
    nus = np.geomspace(nu_min, nu_max, n_levels + 1)[1:]
    ts, (n, d) = time_from_nsr(process, nus), x0.shape
    rows = []                                                 # every level's rows, then its moved rows
    for t in ts:
        x = noised(process, x0, t, rng)
        h = 1e-3 * float(np.sqrt(process.s(t) ** 2 * weight.scale ** 2 + process.sigma(t) ** 2))
        rows += [x, x + h * rng.choice([-1.0, 1.0], size=x0.shape)]
    y0, t_rows = np.vstack(rows), np.repeat(ts, 2 * n)
    gains = []
    for f in (score, _gaussian_score(weight, x0.mean(axis=0), process)):   # all levels in one call per stage
        y = _heun_substeps(f, process, y0, t_rows, np.full(len(y0), process.t_min), n_steps, weight.scale)
        y = tweedie_denoise(f, process, y, process.t_min).reshape(len(ts), 2, n, d)
        gains.append(np.sum((y[:, 1] - y[:, 0]) ** 2, axis=(1, 2)))
    ratios = np.maximum(gains[0] / gains[1], 1e-12)
    log_nu, log_ratio = np.log(np.append(nu_min, nus)), np.log(np.append(1.0, ratios))
    return lambda t: np.exp(np.interp(np.log(process.nsr(t)), log_nu, log_ratio))


def _gaussian_score(weight, mean, process):
    """The exact score of ``N(mean, C)``, ``C = U diag(lambda) U^T + rest (I - U U^T)`` (the weight's covariance),
    under ``process``: ``-(x - s mean) / a`` in the eigenbasis, ``a = s^2 lambda + sigma^2``."""
    U = weight.basis

    def score(x, t):
        s, sigma = as_column(process.s(t)), as_column(process.sigma(t))
        r = x - s * mean
        coords = r @ U
        inside = (coords / (s ** 2 * weight.variances[None, :] + sigma ** 2)) @ U.T
        return -(inside + (r - coords @ U.T) / (s ** 2 * weight.rest + sigma ** 2))
    return score


def _calls_costs(score, process, ts, x0, seed, step, weight, K, correction=None):
    """The costs of a schedule of call levels extended below by ``t_min`` (``ts``, increasing): interval 0 is
    the last step, from ``ts[1]`` to ``sigma = 0``; the others are between consecutive levels, multiplied by
    ``correction(t')`` where given. Common random numbers: the same ``seed`` at every call."""
    rng = as_rng(seed)
    value, stderr = np.empty(len(ts) - 1), np.empty(len(ts) - 1)
    if len(ts) > 2:
        between = _flow_error(score, process, ts[2:], ts[1:-1], x0, rng, step, weight, K)
        factor = 1.0 if correction is None else correction(ts[1:-1])
        value[1:], stderr[1:] = factor * between.value, factor * between.stderr
    value[0], stderr[0] = _final_error(score, process, ts[1], x0, rng, step, weight, K)
    return np.maximum(value, 0.0), stderr


def equal_error_calls(score, process, n_calls, x0, rng, *, step="euler", weight="data", gain=None, n_samples=32,
                      n_substeps=2, max_iter=15, budget=None, batch_size=None, callback=None):
    """The equal local-error rule for ``n_calls`` model calls of a sampler (derived, docs/derivations.md, 12).

    As :func:`equal_error_schedule`, on the levels at which the model is called: the highest is ``t_max``,
    the lowest is free, and the sampler's last step, to ``sigma = 0`` (the denoised output), is one of the
    steps whose local errors against the model's own flow are made equal. ``n_calls`` counts as
    :func:`levels_for_calls`. ``gain``: how an error made at a level is carried to the samples:
    ``"gaussian"``, the weight's (the exact flow's gain for Gaussian data of the data's covariance), or
    ``"measured"``, that weight corrected by the model's own flow (:func:`_measured_gain`, 8 levels,
    about ``96 n_samples`` more evaluations; on a DDPM epsilon-model it was 14x the Gaussian gain at
    ``nu = 120``); default measured for one-step ODE steps, Gaussian for DPM-Solver++(2M), whose
    local errors are not additive, and the ancestral step (docs/derivations.md, 12). Returns a
    ``scoreopt.EqualCostResult`` whose ``ts`` are the call levels (increasing, :func:`levels_for_calls`
    of them, ``ts[-1] = t_max``) and whose ``costs[i]`` is the local error of the step down from
    ``ts[i]``; use them with :func:`sample_calls` or the exports (``scoreopt.to_sigmas``,
    ``scoreopt.to_timesteps``, ``scoreopt.to_diffusers``).

    >>> import scoreopt as so
    >>> process = so.ve()
    >>> score = lambda x, t: -x / (0.25 + np.reshape(process.sigma(t), (-1, 1)) ** 2)   # t: one per row
    >>> x0 = np.random.default_rng(0).normal(0.0, 0.5, (256, 1))
    >>> found = equal_error_calls(score, process, 6, x0, rng=0, step="dpmpp_2m")
    >>> len(found.ts), bool(found.ts[-1] == process.t_max), bool(found.ts[0] > process.t_min)
    (6, True, True)
    """
    process = check_process(process)
    step = resolve_step(step)
    n = levels_for_calls(n_calls, step)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    check_data_scale(np.mean(x0 ** 2, axis=0), process)
    weight = weight if isinstance(weight, FlowWeight) else flow_weight(x0, weight)
    points = x0[rng.choice(len(x0), min(check_int(n_samples, "n_samples", 2), len(x0)), replace=False)]
    checked, seed = guest_score(score, batch_size=batch_size, process=process), int(rng.integers(2 ** 63))
    user = None if callback is None else check_callable(callback, "callback", "callback(done, total, info)")
    if budget is not None:
        user = stop_at_budget(budget, user)
    report = lambda it, total, info: user is not None and user(it, total, dict(info, evaluations=checked.evaluations))
    K = check_int(n_substeps, "n_substeps", 1)
    if gain is None:                                  # measured for one-step ODE steps (docs/derivations.md, 12)
        gain = "gaussian" if getattr(step, "multistep", False) or step is ancestral_step else "measured"
    if gain not in ("measured", "gaussian"):
        raise ValueError(f"`gain` must be 'measured' or 'gaussian', got {gain!r}")
    correction = _measured_gain(checked, process, points, as_rng(seed), weight) if gain == "measured" else None
    costs = lambda ts: _calls_costs(checked, process, ts, points, seed, step, weight, K, correction)
    start = loglinear_schedule(process, n)
    if n == 1:
        L, stderr = costs(start)
        return EqualCostResult(start[1:], L, stderr, True, 0, [], checked.evaluations)
    result = _iterate(costs, start, 1.0, 2 * (getattr(step, "order", 1) + 1), check_int(max_iter, "max_iter", 1),
                      1e-2, report)
    if not result.converged:
        warnings.warn(f"the equal-error iteration did not converge in {result.n_iter} updates; returning the "
                      "schedule of most equal errors seen", RuntimeWarning, stacklevel=2)
    return result._replace(ts=result.ts[1:].copy(), n_evaluations=checked.evaluations)


class Recommendation(NamedTuple):
    """What :func:`recommended_schedule` returns."""
    ts: np.ndarray          # the call levels chosen, increasing (the sampler's last step goes on to sigma = 0)
    name: str               # the candidate they come from
    table: list             # one row per candidate, best first: (name, error, stderr of the difference to the
                            # best, ratio to the best default, ratio to the best baseline, kind)
    n_calls: int            # model calls per sample with the sampler
    n_evaluations: int      # per-sample evaluations spent beyond the rule (reference, candidates, refinement)
    rule: object            # the rule's result (equal_error_calls), or None when not run
    candidates: dict        # every candidate's call levels, by name


# Candidates by kind, from the simplest to explain to the least simple: within seed noise of the best, the
# simplest is chosen.
KINDS = ("default", "baseline", "map", "rule", "refined")


def recommended_schedule(score, process, n_calls, x0, rng, *, step="euler", defaults=None, shift=None, smap=None,
                         rule=True, refine=True, n_draws=32, reference_steps=100, batch_size=None):
    """The schedule to use for ``n_calls`` model calls of a sampler, checked against the model's own
    solution (derived, docs/derivations.md, 12).

    Candidates: ``defaults``, the schedules you already have (a dict name -> call levels; by default
    every consumer's own for this process, ``scoreopt.consumer_schedules(process, n, shift=shift)``:
    diffusers' spacings for a table process, k-diffusion's for a continuous one, the shifted default of
    flow matching, whose ``shift`` you give), the library's baselines (``scoreopt.baseline_schedules``
    with the lowest level left out: the sampler steps from the last level to 0), the paper's map ``smap`` (a
    ``scoreopt.ScheduleMap``, optional) and the equal local-error rule (:func:`equal_error_calls`,
    ``rule=False`` to skip it). Each is run with ``step`` for ``n_calls`` calls (:func:`sample_calls`) from
    ``n_draws`` shared prior draws and compared, by the coupled error (mean squared distance per
    coordinate), with the model's own solution from the same draws (``reference_steps`` log-linear Heun
    steps and the denoiser at ``t_min``). ``refine``: coordinate moves of single levels in ``log nu``
    from the best candidate, each kept only when it lowers the error by more than its standard error.
    Of the candidates within one standard error (of the paired difference) of the best, the simplest
    kind is returned (:data:`KINDS`: a default before a baseline before the map, the rule, a refinement).
    Deterministic steps (Euler/DDIM, Heun, DPM-Solver++(2M)). Returns a :class:`Recommendation`.

    >>> import scoreopt as so
    >>> process = so.ve()
    >>> score = lambda x, t: -x / (0.25 + np.reshape(process.sigma(t), (-1, 1)) ** 2)   # t: one per row
    >>> x0 = np.random.default_rng(0).normal(0.0, 0.5, (256, 1))
    >>> best = recommended_schedule(score, process, 6, x0, rng=0, step="euler", refine=False)
    >>> len(best.ts), best.n_calls, best.name in best.candidates
    (6, 6, True)
    """
    process, step = check_process(process), resolve_step(step)
    if step is ancestral_step or step is euler_maruyama_step:
        raise ValueError("`step` must be deterministic for recommended_schedule, which compares each candidate's "
                         "samples with the model's own solution from the same draws; equal_error_calls gives the "
                         "rule's schedule for a stochastic step")
    n = levels_for_calls(n_calls, step)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    checked = guest_score(score, batch_size=batch_size, process=process)
    if defaults is None:
        defaults = consumer_schedules(process, n, shift=shift)
    candidates = _candidates(process, n, x0, defaults, smap)
    found = None
    if rule:
        found = equal_error_calls(checked, process, n_calls, x0, rng, step=step, batch_size=batch_size)
        candidates["equal local error", "rule"] = found.ts
    before = checked.evaluations
    x_T = prior_sample(process, check_int(n_draws, "n_draws", 2), x0.var(axis=0), rng)
    fine = loglinear_schedule(process, check_int(reference_steps, "reference_steps", n))
    reference = _sample_loop(checked, process, fine, x_T, _Noise("none", "the reference"), heun_step, 0, 0.1, True)[0]
    errors = lambda ts: _draw_errors(_calls_run(checked, process, ts, x_T, step)[0], reference)
    measured = {key: errors(ts) for key, ts in candidates.items()}
    if refine:
        best = min(measured, key=lambda key: measured[key].mean())
        ts, e = _refine(errors, process, candidates[best], measured[best])
        if ts is not candidates[best]:
            candidates[f"refined {best[0]}", "refined"], measured[f"refined {best[0]}", "refined"] = ts, e
    table, chosen = _choose(measured)
    return Recommendation(candidates[chosen].copy(), chosen[0], table, n_calls, checked.evaluations - before, found,
                          {key[0]: ts for key, ts in candidates.items()})


def _candidates(process, n, x0, defaults, smap):
    """The candidates' call levels, keyed by (name, kind)."""
    out = {}
    for name, ts in ({} if defaults is None else dict(defaults)).items():
        ts = check_schedule(ts, process, endpoints=False, name=f"defaults[{name!r}]", min_len=1)
        if len(ts) != n:
            raise ValueError(f"`defaults[{name!r}]` has {len(ts)} levels; {n} make the calls asked for")
        out[str(name), "default"] = ts
    c = float(np.sqrt(np.mean(x0.var(axis=0))))
    for name, ts in baseline_schedules(process, n, c).items():
        out[name, "baseline"] = ts[1:]
    if smap is not None:
        out["the paper's map", "map"] = smap.schedule(n)[1:]
    return out


def _calls_run(score, process, ts, x_T, step, rng=None, callback=None):
    """The sampler on the call levels ``ts`` and its last step to 0, on checked arguments: ``(x, nfe)``.
    Deterministic (``rng`` None) unless given one."""
    rng = _Noise("none", "recommended_schedule") if rng is None else rng
    if len(ts) == 1:                                                    # one call: the denoiser at the top
        return tweedie_denoise(score, process, x_T, ts[0]), 1
    return _sample_loop(score, process, ts, x_T, rng, step, 0, 0.1, True, callback)


def _draw_errors(x, reference):
    """Per-draw coupled errors, ``mean_coordinates (x - reference)^2``; a draw whose error is not finite (a
    candidate that explodes) counts as inf."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.mean((x - reference) ** 2, axis=1)
    return np.where(np.isfinite(e), e, np.inf)


def _paired_stderr(a, b):
    """Standard error of the mean of ``a - b`` (per-draw errors on shared draws); NaN where either is inf."""
    with np.errstate(invalid="ignore"):
        return mean_stderr(a - b).stderr


def _refine(errors, process, ts, e, sweeps=2, fraction=0.3):
    """Coordinate moves of single levels in ``log nu`` (``t_max`` kept), each to ``fraction`` of the way to a
    neighbour (``nu_min`` below the lowest), kept when the error falls by more than its standard error;
    the fraction halves after each sweep. Returns ``(ts, errors)``, ``ts`` itself when nothing moved."""
    start, log_nu = ts, np.log(nsr(process, ts))
    low = np.log(nsr_range(process)[0])
    for sweep in range(sweeps):
        for j in range(len(ts) - 1):
            below = low if j == 0 else log_nu[j - 1]
            for target in (below, log_nu[j + 1]):
                trial = log_nu.copy()
                trial[j] += fraction * (target - log_nu[j])
                ts_trial = time_from_nsr(process, np.exp(trial))
                if np.any(np.diff(ts_trial) <= 0) or ts_trial[0] < process.t_min:
                    continue
                ts_trial[-1] = process.t_max
                e_trial = errors(ts_trial)
                if e.mean() - e_trial.mean() > _paired_stderr(e, e_trial):
                    ts, e, log_nu = ts_trial, e_trial, trial
                    break
        fraction /= 2
    return (start if ts is start else ts), e


def _choose(measured):
    """The table of candidates, best first, and the key chosen: the simplest kind within one standard error
    of the best."""
    keys = sorted(measured, key=lambda key: measured[key].mean())
    best = measured[keys[0]]
    defaults = [measured[k].mean() for k in keys if k[1] == "default"]
    baselines = [measured[k].mean() for k in keys if k[1] == "baseline"]
    ratio = lambda v, ref: v / min(ref) if ref and 0 < min(ref) < np.inf else float("nan")
    table = [(k[0], float(measured[k].mean()), 0.0 if k == keys[0] else _paired_stderr(measured[k], best),
              ratio(measured[k].mean(), defaults), ratio(measured[k].mean(), baselines), k[1]) for k in keys]
    near = [k for k, row in zip(keys, table) if row[1] - table[0][1] <= row[2]]
    return table, min(near, key=lambda k: (KINDS.index(k[1]), measured[k].mean()))


# -- Metrics ---------------------------------------------------------------------

# wasserstein1 integrates over at most this many times the samples' spread (or 1).
MAX_W1_RANGE = 1e6


def wasserstein1(samples, cdf, grid_size=200_001):
    """``W1 = int |F_n(x) - F(x)| dx`` between 1-D samples and an exact CDF, on a uniform grid (trapezoid) over
    the samples' range widened until ``F`` is below 1e-12 and above ``1 - 1e-12``; a CDF that does not
    reach them within ``MAX_W1_RANGE`` times the samples' spread (or 1) is an error, not a hang.

    >>> from scipy.special import ndtr
    >>> round(wasserstein1(np.random.default_rng(0).standard_normal((2000, 1)), ndtr), 2)   # to N(0, 1)
    0.03
    """
    x = _samples_1d(samples, "samples", minimum=1)
    check_callable(cdf, "cdf", "cdf(x) on an array")
    grid_size = check_int(grid_size, "grid_size", 3)
    lo, hi = x[0], x[-1]
    width, bound = max(hi - lo, 1e-3), MAX_W1_RANGE * max(hi - lo, 1.0)
    while True:
        lo_value, hi_value = float(cdf(np.array(lo))), float(cdf(np.array(hi)))
        if lo_value <= 1e-12 and hi_value >= 1 - 1e-12:
            break
        if hi - lo > bound:
            raise ValueError(f"`cdf` does not reach 1e-12 and 1 - 1e-12 within {MAX_W1_RANGE:.0e} times the samples' "
                             "spread (or 1): it is not a CDF, or its tails are too heavy for W1 on a grid")
        lo, hi = (lo - width if lo_value > 1e-12 else lo), (hi + width if hi_value < 1 - 1e-12 else hi)
        width *= 2.0
    grid = np.linspace(lo, hi, grid_size)
    values = np.asarray(cdf(grid), dtype=float)
    if values.shape != grid.shape or not np.all(np.isfinite(values)) or np.any(np.diff(values) < -1e-12) \
            or values.min() < -1e-12 or values.max() > 1 + 1e-12:
        raise ValueError("`cdf` must return finite, non-decreasing values in [0, 1], one per point")
    return float(trapezoid(np.abs(np.searchsorted(x, grid, side="right") / len(x) - values), grid))


def _samples_1d(samples, name, minimum):
    """Finite 1-D samples (one value per sample), sorted; at least ``minimum``."""
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
    """Mass of 1-D samples within ``radius`` of each mode, and how many modes hold at least half their weight
    (equal weights by default); the default radius is a quarter of the smallest gap between modes.

    >>> mode_coverage(np.array([[0.0], [0.01], [1.0]]), np.array([0.0, 1.0])).covered
    2
    """
    x = _samples_1d(samples, "samples", minimum=1)
    modes = as_real_array(modes, "modes").reshape(-1)
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
    """Mean log-density of samples under the true ``p_0`` (the paper's "average likelihood").

    >>> import models
    >>> x = np.random.default_rng(0).standard_normal((2000, 1))
    >>> round(float(mean_log_density(x, models.Gaussian([0.0], [1.0]))), 2)     # -(1 + log 2 pi) / 2 = -1.42
    -1.42
    """
    values = np.asarray(target.log_prob(samples), dtype=float)
    if values.size == 0:
        raise ValueError("`samples` must not be empty")
    return float(np.mean(values))


def density_estimate(samples, grid, bandwidth=None):
    """Gaussian kernel density estimate of 1-D samples on ``grid`` (for plots only).

    >>> density_estimate(np.random.default_rng(0).standard_normal((2000, 1)), np.array([0.0])).round(1)   # 0.399
    array([0.4])
    """
    x = _samples_1d(samples, "samples", minimum=2)
    if x[0] == x[-1]:
        raise ValueError("`samples` must not all be equal: a kernel density needs a spread")
    return gaussian_kde(x, bw_method=bandwidth)(as_real_array(grid, "grid"))


def score_error(score, exact_score, process, ts, x0, rng):
    """``E_{i, x ~ p_{t_i}} sigma(t_i)^2 ||S_theta(x, t_i) - S(x, t_i)||^2`` over the levels of ``ts``, fresh
    noise per level; an ``Estimate`` whose standard error treats the levels as independent.

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> score = lambda x, t: target.score(x, t, p)
    >>> off = lambda x, t: 1.1 * score(x, t)                             # a model 10% off the exact score
    >>> score_error(off, score, p, so.uniform_schedule(p, 4), target.sample(200, 0), 0).value > 0
    True
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
    """A model's error at every level of ``ts`` against the exact score, on data ``x0`` (held out): the scaled
    score error ``sigma^2 ||S_theta - S||^2`` and the denoised estimate's error ``(sigma^2 / s)^2 ||S_theta -
    S||^2``, which carries the score error times ``nu^2`` (large at the noisy end for a model that predicts
    the noise). Means over the rows with standard errors.

    >>> import models, scoreopt as so
    >>> target, p = models.Gaussian([0.0], [0.25]), so.ve()
    >>> exact = lambda x, t: target.score(x, t, p)
    >>> off = lambda x, t: exact(x, t) + 0.1                     # a model whose score is off by 0.1
    >>> r = score_error_by_level(off, exact, p, [0.5], target.sample(100, 0), 0)
    >>> round(float(r.score_error[0] / p.sigma(0.5) ** 2), 6)    # sigma^2 * 0.1^2, divided by sigma^2
    0.01
    """
    process = check_process(process)
    ts = check_schedule(ts, process, endpoints=False, min_len=1)
    x0, rng = check_data(x0, min_rows=2), as_rng(rng)
    score, exact = guest_score(score, process=process), guest_score(exact_score, "exact_score")
    levels = []
    for t in ts:
        x = noised(process, x0, t, rng)
        diff2 = np.sum((score(x, t) - exact(x, t)) ** 2, axis=1)
        sigma2, s = float(process.sigma(t)) ** 2, float(process.s(t))
        levels.append((*mean_stderr(sigma2 * diff2), *mean_stderr((sigma2 / s) ** 2 * diff2)))
    return ScoreErrorByLevel(ts, process.nsr(ts), *np.array(levels).T)


def sliced_wasserstein(x, y, rng, n_projections=256):
    """Sliced W1 between two samples ``(n, d)`` and ``(m, d)``: the mean over ``n_projections`` random
    directions (uniform on the sphere) of the exact 1-D W1 of the two empirical laws of the projections.

    >>> x = np.random.default_rng(0).standard_normal((1000, 2))
    >>> bool(sliced_wasserstein(x[:500], x[500:], 0) < sliced_wasserstein(x[:500], x[500:] + 1.0, 0))
    True
    """
    x, y = check_data(x, "x"), check_data(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    theta = as_rng(rng).standard_normal((check_int(n_projections, "n_projections", 1), x.shape[1]))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    return float(np.mean([_w1_empirical(a, b) for a, b in zip(theta @ x.T, theta @ y.T)]))


def _w1_empirical(a, b):
    """Exact W1 between two 1-D empirical laws: the integral of ``|F_a - F_b|`` between the pooled points."""
    z = np.sort(np.concatenate([a, b]))
    Fa = np.searchsorted(np.sort(a), z[:-1], side="right") / len(a)
    Fb = np.searchsorted(np.sort(b), z[:-1], side="right") / len(b)
    return float(np.sum(np.abs(Fa - Fb) * np.diff(z)))


def mmd2(x, y, bandwidth=None):
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel ``exp(-|u - v|^2 / (2 h^2))``, ``h``
    the median distance of the pooled samples by default; the U-statistic may be slightly negative for
    equal laws. Memory ``O((n + m)^2)``.

    >>> x = np.random.default_rng(0).standard_normal((1000, 1))
    >>> round(float(mmd2(x[:500], x[500:])), 3), bool(mmd2(x[:500], x[500:] + 1.0) > 0.1)
    (0.001, True)
    """
    x, y = check_data(x, "x", min_rows=2), check_data(y, "y", min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    d2 = cdist(np.vstack([x, y]), np.vstack([x, y]), "sqeuclidean")
    h2 = (float(np.median(d2[np.triu_indices(len(d2), 1)])) / 2.0 if bandwidth is None
          else check_positive(bandwidth, "bandwidth") ** 2)
    if h2 <= 0:
        raise ValueError("the samples coincide: the median heuristic gives no bandwidth (pass `bandwidth`)")
    k, n, m = np.exp(-d2 / (2.0 * h2)), len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())
