"""Sampler-aware schedules: the KL-optimal limit, and the U-statistic of the ancestral step's error in law
(derived: docs/derivations.md, sections 7-9)."""

import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
PROCESSES = [pytest.param(VE, id="ve"), pytest.param(VP, id="vp_linear")]


def exact(target, process):
    return lambda x, t: target.score(x, t, process)


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("target", [models.Gaussian([0.0], [0.25]), models.Gaussian(np.zeros(8), np.arange(1, 9) ** -1.0)],
                         ids=["1d", "8d"])
@pytest.mark.parametrize("predictor", ["euler", "heun", "ancestral"])
def test_limit_is_at_least_as_good_as_every_baseline(process, target, predictor):
    T = 6
    limit = sm.gaussian_schedule_kl(target, process, sm.gaussian_optimal_schedule(target, process, T, predictor=predictor),
                                    predictor=predictor)
    c = float(np.sqrt(np.mean(target.variance())))
    for name, ts in so.baseline_schedules(process, T, c).items():
        assert limit <= sm.gaussian_schedule_kl(target, process, ts, predictor=predictor) * (1 + 1e-9), name


def test_limit_improves_on_its_starts_and_heun_beats_the_baselines_by_far():
    # Measured (README): for Heun the limit is several times below the best baseline.
    target = models.Gaussian(np.zeros(8), np.arange(1, 9) ** -1.0)
    start = so.edm_schedule(VE, 8, 5.0)
    ts = sm.gaussian_optimal_schedule(target, VE, 8, predictor="heun", starts=[start])
    so.check_schedule(ts, VE)
    kl = lambda ts: sm.gaussian_schedule_kl(target, VE, ts, predictor="heun")
    best_baseline = min(kl(b) for b in so.baseline_schedules(VE, 8, 0.5).values())
    assert kl(ts) < kl(start) and kl(ts) < 0.5 * best_baseline


def test_euler_maruyama_limit_is_degenerate():
    # Its per-step variance errors change sign: the optimiser cancels them (docs/derivations.md, section 7).
    target = models.Gaussian([0.0], [0.25])
    ts = sm.gaussian_optimal_schedule(target, VE, 6, predictor="euler_maruyama")
    assert sm.gaussian_schedule_kl(target, VE, ts, predictor="euler_maruyama") < 1e-9


def test_squared_mean_is_the_square_of_the_mean_with_a_jackknife_error_and_never_negative():
    # The ||E m||^2 behind the ancestral step's error in law (sampler._ancestral_weak_error): the plain
    # square of the overall mean, positive, so an interval whose signal is below the noise never looks
    # free (the unbiased U-statistic could be negative and collapsed a schedule: docs/derivations.md, 9.3).
    M = np.random.default_rng(0).standard_normal((7, 5)) + 0.3
    value, se = sm._squared_mean(M)
    assert value == pytest.approx(np.sum(M.mean(axis=0) ** 2), rel=1e-12)
    leave_out = [np.sum(np.mean(np.delete(M, k, axis=0), axis=0) ** 2) for k in range(7)]
    assert se == pytest.approx(np.sqrt(6 / 7 * np.sum((np.array(leave_out) - np.mean(leave_out)) ** 2)), rel=1e-10)
    noise = np.random.default_rng(1).standard_normal((4, 3))           # mean zero: the U-statistic can be < 0
    assert sm._squared_mean(noise).value > 0


def test_the_limit_refuses_a_start_of_another_length():
    target = models.Gaussian([0.0], [0.25])
    with pytest.raises(ValueError, match="must have T \\+ 1 = 5 times"):
        sm.gaussian_optimal_schedule(target, VE, 4, predictor="euler", starts=[so.uniform_schedule(VE, 3)])
