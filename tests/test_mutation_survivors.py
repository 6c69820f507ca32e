"""Behaviours that the mutation runs of 2026-12-03 and 2026-12-07 found no test pinning down
(docs/reports/mutation.md): each test here fails with the mutant named in its comment applied by hand,
and passes on the code."""
import io
import json
import warnings

import numpy as np
import pytest
from scipy.stats import gaussian_kde

import models
import sampler as sm
import scoreopt as so

VP = so.vp_linear()


def exact(target, process):
    return lambda x, t: target.score(x, t, process)


def test_iterate_schedule_refuses_costs_of_the_wrong_length():
    # _iterate checked the costs' shape but not their length (mutant: check_costs(value, None)).
    ts = np.linspace(0.0, 1.0, 6)
    with pytest.raises(ValueError, match="of length 5, got shape"):
        so.iterate_schedule(lambda ts: np.ones(len(ts)), ts, max_iter=3)


def test_density_estimate_uses_the_bandwidth_it_is_given():
    # The bandwidth was not pinned (mutant: gaussian_kde(x, bw_method=None)).
    x = np.random.default_rng(0).standard_normal(200)
    grid = np.linspace(-3.0, 3.0, 13)
    narrow = sm.density_estimate(x, grid, bandwidth=0.05)
    np.testing.assert_allclose(narrow, gaussian_kde(x, bw_method=0.05)(grid), rtol=1e-12)
    assert not np.allclose(narrow, sm.density_estimate(x, grid))


def test_the_progress_printer_prints_about_lines_times_with_lambda():
    # The cadence and the Lambda field (mutants: `and` -> `or` in the cadence; the key "Lambda" -> "lambda";
    # its format's text).
    out = io.StringIO()
    callback = so.progress_printer("run", lines=2, file=out)
    for done in range(1, 5):
        callback(done, 4, {"loss": 0.5, "Lambda": 1.25, "evaluations": 1000})
    assert out.getvalue().splitlines() == ["run 2/4  loss 0.5000  Lambda 1.250  1,000 evaluations",
                                           "run 4/4  loss 0.5000  Lambda 1.250  1,000 evaluations"]


def test_trains_callback_info_holds_the_params_and_the_last_lambda():
    # What train's docstring promises the callback (mutants: the keys "params" and "Lambda" renamed).
    seen = []
    online = models.OnlineSchedule(every=5, burn_in=5, n_samples=50)
    state = models.train(models.init_mlp(0, width=8, depth=1), models.Gaussian([0.0], [0.25]), so.ve(),
                         so.uniform_schedule(so.ve(), 4), rng=0, n_steps=6, batch_size=16, online=online,
                         callback=lambda step, n, info: seen.append(info))
    assert len(seen) == 6
    assert seen[0]["Lambda"] is None and seen[-1]["Lambda"] == state.history["Lambda"][-1]
    for (W, b), (W_end, b_end) in zip(seen[-1]["params"], state.params):
        np.testing.assert_array_equal(W, W_end)
        np.testing.assert_array_equal(b, b_end)


def test_the_command_line_exports_flow_matching_times(tmp_path, capsys):
    # `--convention flow` had no test (mutant: smap.schedule(None) in the command line's export).
    fm = so.flow_matching()
    target = models.Gaussian([0.0], [0.3])
    smap = so.estimate_schedule_map(exact(target, fm), fm, target.sample(200, 0), 1, n_grid=20)
    path = str(tmp_path / "flow.json")
    smap.save(path)
    assert so.main([path, "-n", "6", "--convention", "flow", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(printed["values"], smap.flow_times(fm, 6), rtol=1e-12)
    assert len(printed["values"]) == 6 and printed["values"][0] == 1.0


def test_a_map_file_without_grid_error_loads_with_a_zero_grid_error(tmp_path):
    # Files saved before the grid error was recorded (mutant: the default 0.0 -> 1.0).
    target = models.Gaussian([0.0], [0.3])
    smap = so.estimate_schedule_map(exact(target, VP), VP, target.sample(200, 0), 1, n_grid=20)
    path = tmp_path / "old.json"
    smap.save(str(path))
    data = json.loads(path.read_text())
    del data["grid_error"]
    path.write_text(json.dumps(data))
    old = so.load_schedule_map(str(path))
    assert old.grid_error == 0.0 and old.length_uncertainty == old.length_stderr


def test_the_control_variate_works_for_a_process_whose_scale_is_constant():
    # VE has s' = 0; the control variate's A' = 2 s s' var + 2 sigma sigma' was only tested on VP
    # (mutant: 2 s / s' var, a division by zero on VE). With the exact score of Gaussian data the
    # control removes nearly all of the spread.
    ve, target = so.ve(), models.Gaussian([0.0], [0.25])
    x0 = target.sample(400, 0)
    spread = {cv: np.mean(m.delta_stderr / m.delta) for cv, m in
              ((cv, so.estimate_schedule_map(exact(target, ve), ve, x0, 2, n_grid=20, control_variate=cv))
               for cv in (False, True))}
    assert spread[True] < 0.5 * spread[False]


def test_schedules_outside_the_process_are_refused_where_they_enter():
    # interval_costs, to_timesteps and train checked a schedule without its process (mutants:
    # check_schedule(ts) without the process in each).
    target = models.Gaussian([0.0], [0.3])
    below = np.array([5e-4, 0.3, 0.6, 1.0])                     # VP starts at t_min = 1e-3
    with pytest.raises(ValueError, match=r"`ts` must lie in \[0.001, 1"):
        so.interval_costs(exact(target, VP), VP, below, target.sample(20, 0), 0)
    table = so.process_from_alphas_cumprod(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    with pytest.raises(ValueError, match=r"`ts` must lie in \[0.0, 1.0\]"):
        so.to_timesteps(table, [0.0, 0.5, 1.5])                 # call levels beyond t_max = 1
    with pytest.raises(ValueError, match="must start at t_min"):
        models.train(models.init_mlp(0, width=8, depth=1), target, VP, below, rng=0, n_steps=1, batch_size=8)


# --- The run of 2026-12-07 (commit 07adb73), on mutants drawn after every test above was written -----------

VE = so.ve()
GAUSS = lambda x, t: -x / (0.25 + np.reshape(VE.sigma(t), (-1, 1)) ** 2)     # N(0, 0.5^2 I), t: one per row
X0 = 0.5 * np.random.default_rng(3).standard_normal((200, 2))


def test_stop_at_budget_passes_the_iteration_s_info_to_the_callback_it_chains():
    # mutants: stop_at_budget calling callback(it, total) without info; _iterate's info key "ts" -> "TS".
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                          # stopped on purpose: not converged
        so.equal_cost_schedule(GAUSS, VE, so.uniform_schedule(VE, 4), X0, 0,
                               callback=so.stop_at_budget(20_000, lambda it, total, info: seen.append(info)))
    assert seen and {"ts", "costs", "evaluations"} <= set(seen[0]) and len(seen[0]["ts"]) == 5


def test_ve_names_itself_by_its_range():
    # mutant: ve's Process without its name (the default "process"): adapters and map files tell processes
    # apart by it.
    assert so.ve().name == "ve(0.002, 80)" and so.ve(0.01, 10.0).name == "ve(0.01, 10)"


def test_a_flow_match_scheduler_instance_gives_its_own_shift():
    # mutant: the instance's .shift never read (the class-name check lower-cased).
    class FlowMatchEulerDiscreteScheduler:                       # duck-typed, as the export reads it
        shift, config = 3.0, {"shift": 3.0, "use_dynamic_shifting": False}
    flow, ts = so.flow_matching(), [0.25, 0.5]
    assert so.to_diffusers(flow, ts, FlowMatchEulerDiscreteScheduler()) == \
        so.to_diffusers(flow, ts, "FlowMatchEulerDiscreteScheduler", shift=3.0)


@pytest.mark.filterwarnings("ignore:the equal-error iteration did not converge")     # two updates on purpose
def test_the_rule_for_calls_runs_with_the_ancestral_step_and_a_low_rank_weight():
    # mutants: _final_error's ancestral branch with its arguments shifted; _ancestral_weak_error's sum losing
    # its array (a TypeError with a weight of rank k < d).
    x0 = 0.5 * np.random.default_rng(4).standard_normal((64, 3))
    score = lambda x, t: -x / (0.25 + np.reshape(VE.sigma(t), (-1, 1)) ** 2)
    for weight in ("data", sm.flow_weight(x0, rank=1)):
        r = sm.equal_error_calls(score, VE, 3, x0, 0, step="ancestral", weight=weight, n_samples=8, max_iter=2)
        assert len(r.ts) == 3 and r.ts[-1] == VE.t_max and np.all(np.isfinite(r.costs)) and np.all(r.costs > 0)


def test_the_recommended_call_lists_the_paper_s_map_as_a_map():
    # mutant: the map candidate's kind "map" -> "XXmapXX" (KINDS.index would fail on it).
    smap = so.estimate_schedule_map(GAUSS, VE, X0, 0, n_grid=30)
    best = sm.recommended_schedule(GAUSS, VE, 4, X0, 0, smap=smap, rule=False, refine=False, n_draws=8,
                                   reference_steps=20)
    kinds = {row[0]: row[5] for row in best.table}
    assert kinds["the paper's map"] == "map"
    np.testing.assert_array_equal(best.candidates["the paper's map"], smap.schedule(4)[1:])


def test_prior_variance_refuses_a_negative_data_variance():
    # mutant: the negative check dropped.
    with pytest.raises(ValueError, match="`data_var` must be a finite non-negative vector"):
        sm.prior_variance(VE, [1.0, -0.5])


def test_refinement_moves_the_lowest_level_down_when_that_helps():
    # mutant: the lowest level's downward trial aimed at the top level instead of nu_min, so it never moved
    # down. An error that falls with the lowest level's nu, the same on every draw, is lowered by moving it.
    errors = lambda ts: np.full(8, float(so.nsr(VE, ts[:1])[0]))
    ts = so.time_from_nsr(VE, np.geomspace(1.0, 80.0, 4))
    moved, e = sm._refine(errors, VE, ts, errors(ts))
    assert so.nsr(VE, moved[:1])[0] < 1.0 and e.mean() < errors(ts).mean() and moved[-1] == VE.t_max


def test_teacher_schedule_calls_the_score_in_batches_of_batch_size():
    # mutant: batch_size ignored.
    rows = []
    score = lambda x, t: (rows.append(len(x)), GAUSS(x, t))[1]
    sm.teacher_schedule(score, VE, 3, X0, 0, n_draws=8, n_cells=12, batch_size=3)
    assert rows and max(rows) <= 3


def test_sample_calls_refuses_levels_outside_the_process():
    # mutant: the call levels checked without the process.
    x_T = sm.prior_sample(VE, 4, [0.25, 0.25], 0)
    with pytest.raises(ValueError, match="must lie in"):
        sm.sample_calls(GAUSS, VE, [0.5, 1.5], x_T, 0)


def test_the_oracle_counts_its_evaluations_up():
    # mutant: _CountingScore decrementing its count.
    target = models.Gaussian([0.0], [0.25])
    r = sm.coupled_optimal_schedule(lambda x, t: target.score(x, t, VE), VE, 3, target.sample(100, 0), 0, n_draws=8,
                                    reference_steps=20, max_iter=2)
    assert r.n_evaluations >= 2 * 20 - 1          # per sample, at least the reference's 20 Heun steps


def test_the_recommended_call_refuses_a_step_that_draws_noise():
    # mutant: _calls_run's rng no longer refusing draws (a step drawing noise would run with zero noise).
    def noisy(score, process, x, t_cur, t_next, rng):
        return x + 0.1 * rng.standard_normal(x.shape), 1
    with pytest.raises(ValueError, match="the step draws noise: recommended_schedule needs a deterministic step"):
        sm.recommended_schedule(GAUSS, VE, 3, X0, 0, step=noisy, rule=False, refine=False, n_draws=4,
                                reference_steps=10)


def test_mlp_score_s_default_data_moments_are_zero_mean_and_unit_variance():
    # mutant: mlp_score's default data_var 2.0 (only a direct caller sees it).
    params = models.init_mlp(np.random.default_rng(0), dim=2)
    x, t = np.ones((3, 2)), 0.4
    np.testing.assert_array_equal(models.mlp_score(params, x, t, VE),
                                  models.mlp_score(params, x, t, VE, data_mean=0.0, data_var=1.0))
    assert not np.allclose(models.mlp_score(params, x, t, VE), models.mlp_score(params, x, t, VE, data_var=2.0))


def test_training_samples_a_target_that_has_only_a_sample_method():
    # mutant: a data object with sample() but no mean/variance passed whole to check_data (refused).
    class OnlySamples:
        def sample(self, n, rng):
            return 0.5 * np.random.default_rng(rng).standard_normal((n, 1))
    state = models.train(models.init_mlp(0, dim=1, width=8, depth=2), OnlySamples(), VE, so.uniform_schedule(VE, 4),
                         rng=0, n_steps=2, batch_size=16)
    assert abs(float(state.data_var[0]) - 0.25) < 0.02 and state.step == 2
