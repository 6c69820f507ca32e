"""Schedules for n model calls and the checked choice among candidates (derived: docs/derivations.md, 10)."""

import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VE, VP = so.ve(), so.vp_linear()
GAUSS = models.Gaussian(np.zeros(4), np.array([0.05, 0.2, 0.5, 1.0]))
X0 = GAUSS.sample(2000, 0)


def exact(process):
    return lambda x, t: GAUSS.score(x, t, process)


def bimodal_score(process):
    target = models.GaussianMixture([0.5, 0.5], np.array([[-1.0, 0.0], [1.0, 0.5]]), np.array([[0.01, 0.04]] * 2))
    return target, (lambda x, t: target.score(x, t, process))


# --- counting calls ---------------------------------------------------------------

@pytest.mark.parametrize("step, n_calls, levels", [("euler", 7, 7), ("dpmpp_2m", 4, 4), ("ancestral", 10, 10),
                                                   ("heun", 9, 5), ("heun", 1, 1)])
def test_levels_for_calls_counts_as_k_diffusion(step, n_calls, levels):
    assert sm.levels_for_calls(n_calls, step) == levels


def test_heun_needs_an_odd_number_of_calls():
    with pytest.raises(ValueError, match=r"`n_calls` = 10 is even.*9 or 11"):
        sm.levels_for_calls(10, "heun")


@pytest.mark.parametrize("step", ["euler", "heun", "dpmpp_2m"])
def test_sample_calls_makes_exactly_the_calls_counted(step):
    ts = so.edm_schedule(VE, 6)[1:]                                   # 6 levels, the lowest free
    calls = []
    score = lambda x, t: calls.append(1) or exact(VE)(x, t)
    out = sm.sample_calls(score, VE, ts, sm.prior_sample(VE, 50, GAUSS.variance(), 0), 1, step=step)
    expected = 2 * 6 - 1 if step == "heun" else 6
    assert out.nfe == expected == len(calls)


@pytest.mark.parametrize("step", ["euler", "heun", "dpmpp_2m"])
def test_sample_calls_is_the_sampler_with_its_final_denoising(step):
    # On levels that start at t_min, sample_calls is sample(..., denoise=True) exactly (k-diffusion's last step).
    ts, x_T = so.edm_schedule(VP, 5), sm.prior_sample(VP, 40, GAUSS.variance(), 2)
    a = sm.sample_calls(exact(VP), VP, ts, x_T, 3, step=step).x
    b = sm.sample(exact(VP), VP, ts, x_T, 3, predictor=step, denoise=True).x
    np.testing.assert_array_equal(a, b)


def test_one_call_is_the_denoiser_at_the_top_level():
    x_T = sm.prior_sample(VE, 30, GAUSS.variance(), 4)
    out = sm.sample_calls(exact(VE), VE, [VE.t_max], x_T, 0)
    np.testing.assert_allclose(out.x, sm.tweedie_denoise(exact(VE), VE, x_T, VE.t_max), rtol=1e-12)
    assert out.nfe == 1


# --- the rule for n calls ---------------------------------------------------------

@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp"])
@pytest.mark.parametrize("step, n_calls", [("euler", 6), ("heun", 7), ("dpmpp_2m", 5)])
def test_equal_error_calls_gives_the_levels_of_the_calls_with_the_lowest_free(process, step, n_calls):
    found = sm.equal_error_calls(exact(process), process, n_calls, X0, 0, step=step, gain="gaussian")
    n = sm.levels_for_calls(n_calls, step)
    assert len(found.ts) == len(found.costs) == n
    assert found.ts[-1] == process.t_max and found.ts[0] > process.t_min and np.all(np.diff(found.ts) > 0)
    if found.converged:                                                # the errors are equal at the fixed point
        assert np.ptp(np.log(found.costs)) < 0.25


def test_equal_error_calls_is_deterministic_in_its_seed_and_seeds_differ():
    a = sm.equal_error_calls(exact(VE), VE, 5, X0, 3, n_samples=16)
    b = sm.equal_error_calls(exact(VE), VE, 5, X0, 3, n_samples=16)
    c = sm.equal_error_calls(exact(VE), VE, 5, X0, 4, n_samples=16)
    np.testing.assert_array_equal(a.ts, b.ts)
    assert not np.array_equal(a.ts, c.ts)


@pytest.mark.parametrize("process", [VE, VP], ids=["ve", "vp"])
def test_measured_gain_is_one_where_the_gaussian_weight_is_exact(process):
    # For Gaussian data the exact flow is linear and its squared gain is the weight (docs/derivations.md, 9.1):
    # the measured correction must be 1 at every level, to the accuracy of 12 Heun steps and 512 directions.
    weight = sm.flow_weight(X0)
    correction = sm._measured_gain(exact(process), process, X0[:512], np.random.default_rng(0), weight)
    ts = so.time_from_nsr(process, np.geomspace(*so.nsr_range(process), 9))
    np.testing.assert_allclose(correction(ts), 1.0, rtol=0.06)


def test_measured_gain_sees_a_flow_unlike_the_gaussian_one():
    # Two narrow modes two apart: at high noise an error decides which mode a row goes to, so it is carried
    # much further than by the flow of Gaussian data of the same covariance; near the modes the flow
    # contracts every row onto its mode, so an error is carried less far.
    target, score = bimodal_score(VE)
    x0 = target.sample(2000, 1)
    correction = sm._measured_gain(score, VE, x0[:256], np.random.default_rng(0), sm.flow_weight(x0))
    high, near = correction(so.time_from_nsr(VE, np.array([20.0, 0.3])))
    assert high > 10.0 and near < 0.5


def test_the_last_step_is_measured_to_zero():
    # With a single call the only step is the denoiser at t_max; its error against the flow is the
    # cost, and it is large (the denoiser at nu = 80 is the data's mean).
    found = sm.equal_error_calls(exact(VE), VE, 1, X0, 0)
    assert found.ts.tolist() == [VE.t_max] and found.costs[0] > 0.1


# --- the checked choice -----------------------------------------------------------

def test_recommended_schedule_is_the_least_coupled_error_up_to_its_noise():
    best = sm.recommended_schedule(exact(VE), VE, 6, X0, 0, step="euler", refine=False)
    names = [row[0] for row in best.table]
    errors = {row[0]: row[1] for row in best.table}
    assert set(names) >= {"karras", "exponential", "equal local error", "edm7", "uniform"}
    assert [row[1] for row in best.table] == sorted(errors.values())
    chosen = errors[best.name]
    assert chosen <= best.table[0][1] + dict((r[0], r[2]) for r in best.table)[best.name] + 1e-15
    assert len(best.ts) == 6 and best.n_calls == 6
    # Out of sample (512 fresh draws): the choice is no worse than the best default, up to 3 standard errors.
    x_T = sm.prior_sample(VE, 512, X0.var(axis=0), 99)
    reference = sm.sample_calls(exact(VE), VE, so.loglinear_schedule(VE, 200), x_T, 0, step="heun").x
    per_draw = lambda ts: np.mean((sm.sample_calls(exact(VE), VE, ts, x_T, 0).x - reference) ** 2, axis=1)
    default = min((row for row in best.table if row[5] == "default"), key=lambda row: row[1])[0]
    difference = per_draw(best.ts) - per_draw(best.candidates[default])
    assert difference.mean() <= 3 * difference.std(ddof=1) / np.sqrt(len(difference))


def test_within_noise_a_default_is_preferred():
    # A default equal to the best candidate ties with it exactly: the simplest kind (a default) is chosen.
    first = sm.recommended_schedule(exact(VE), VE, 6, X0, 0, refine=False, rule=False, defaults={})
    winner = first.candidates[first.name]
    again = sm.recommended_schedule(exact(VE), VE, 6, X0, 0, refine=False, rule=False, defaults={"yours": winner})
    assert again.name == "yours"
    np.testing.assert_array_equal(again.ts, winner)


def test_refinement_only_keeps_what_it_measures_better():
    target, score = bimodal_score(VE)
    x0 = target.sample(2000, 2)
    plain = sm.recommended_schedule(score, VE, 5, x0, 0, refine=False)
    refined = sm.recommended_schedule(score, VE, 5, x0, 0, refine=True)
    best_plain = plain.table[0][1]
    assert refined.table[0][1] <= best_plain
    assert refined.n_evaluations > plain.n_evaluations


def test_recommended_cost_beyond_the_rule_is_counted_and_bounded():
    best = sm.recommended_schedule(exact(VE), VE, 10, X0, 0, step="euler")
    # reference 32 x (2 x 100 + 1), 10 candidates x 32 x 10, refinement at most 2 sweeps x 2 x 9 x 32 x 10
    assert 32 * 201 + 10 * 320 <= best.n_evaluations <= 32 * 201 + 10 * 320 + 36 * 320


def test_recommended_schedule_refuses_stochastic_steps_and_wrong_defaults():
    with pytest.raises(ValueError, match="deterministic"):
        sm.recommended_schedule(exact(VE), VE, 6, X0, 0, step="ancestral")
    with pytest.raises(ValueError, match=r"`defaults\['a'\]` has 3 levels; 6"):
        sm.recommended_schedule(exact(VE), VE, 6, X0, 0, defaults={"a": [0.2, 0.5, 1.0]})
    with pytest.raises(ValueError, match="`gain`"):
        sm.equal_error_calls(exact(VE), VE, 6, X0, 0, gain="bogus")


def test_a_candidate_that_explodes_is_ranked_last_not_chosen():
    # A default whose last level is where the model's output is huge (finite, so the model is not at fault):
    # its squared errors overflow, its draws count as inf, and the choice is among the finite candidates.
    def score(x, t):
        huge = np.reshape(VE.nsr(t), (-1, 1)) * np.ones_like(x) == VE.nsr(0.3)
        return np.where(huge, 1e200, exact(VE)(x, t))
    best = sm.recommended_schedule(score, VE, 4, X0, 0, refine=False, rule=False,
                                   defaults={"explodes": [0.3, 0.5, 0.75, 1.0]})
    assert best.name != "explodes" and best.table[-1][0] == "explodes" and best.table[-1][1] == np.inf
