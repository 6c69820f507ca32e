"""Behaviours that the mutation run of 2026-12-03 found no test pinning down (docs/reports/mutation.md):
each test here fails with the mutant named in its comment applied by hand, and passes on the code."""
import io
import json

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
