"""The paper's part of each module stands alone: cut every module at its ``# PART II`` line, import the
cut modules from a temporary folder, and the paper still runs and holds.

This is the vendorable core: a reader who copies Part I of ``scoreopt.py``, ``sampler.py`` and
``models.py`` gets processes, the costs, the local cost, the path length and its inverse,
Algorithms 1 and 2, the predictor-corrector sampler and training, and these tests say so.
"""
import ast
import io
import os
import re
import subprocess
import sys
import textwrap
import tokenize

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODULES = ("scoreopt", "sampler", "models")


@pytest.fixture(scope="module")
def cut_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("part_one")
    for name in MODULES:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        marker = [i for i, line in enumerate(lines) if line.startswith("# PART II")]
        assert len(marker) == 1, f"{name}.py must have exactly one line that begins '# PART II'"
        (folder / f"{name}.py").write_text("\n".join(lines[:marker[0]]) + "\n", encoding="utf-8")
    return folder


def run_cut(folder, code):
    """Run ``code`` in a fresh interpreter that sees only the cut modules (not the installed ones)."""
    script = "import sys; sys.path.insert(0, sys.argv[1])\n" + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300,
                         cwd=str(folder), env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_cut_modules_import_alone_and_none_of_part_two_is_left(cut_folder):
    out = run_cut(cut_folder, """
        import scoreopt, sampler, models
        for m in (scoreopt, sampler, models):
            assert m.__file__.startswith(sys.argv[1]), m.__file__
            missing = [n for n in m.__all__ if not hasattr(m, n)]
            assert not missing, (m.__name__, missing)
        assert not hasattr(scoreopt, "estimate_schedule_map") and not hasattr(sampler, "heun_step")
        assert "heun" not in sampler.PREDICTORS and "between" not in models.LEVELS
        assert models.OnlineSchedule().route == "grid" and scoreopt.ROUTES["grid"] is scoreopt.grid_route
        print(len(scoreopt.__all__), len(sampler.__all__), len(models.__all__))
    """)
    assert all(int(n) > 5 for n in out.split())


def test_the_cut_modules_recover_the_closed_form_schedule_of_gaussian_data(cut_folder):
    # VE and N(0, c^2 I_d): Lambda(sigma) = 2 sqrt(d) [asinh(sigma/c) - sigma / sqrt(c^2 + sigma^2)]
    # (docs/derivations.md, 1), so the optimal levels solve Lambda(sigma_i) = i Lambda / T.
    run_cut(cut_folder, """
        import numpy as np
        from scipy.optimize import brentq
        import scoreopt as so, models
        p, c, d, T = so.ve(), 0.5, 3, 10
        target = models.Gaussian(np.zeros(d), c ** 2)
        ts = so.time_from_nsr(p, np.geomspace(0.002, 80.0, 400))
        delta = so.local_cost(lambda x, t: target.score(x, t, p), p, ts, target.sample(4000, 0), 1).value
        sigmas = so.nsr(p, so.optimal_schedule(ts, delta, T))
        L = lambda s: 2 * np.sqrt(d) * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
        exact = [brentq(lambda s: L(s) - L(0.002) - i / T * (L(80.0) - L(0.002)), 0.002, 80.0) for i in range(1, T)]
        assert np.allclose(sigmas[1:-1], exact, rtol=0.05), (sigmas, exact)
    """)


def test_the_cut_modules_keep_algorithm_one_s_invariances(cut_folder):
    run_cut(cut_folder, """
        import numpy as np
        import scoreopt as so
        rng = np.random.default_rng(0)
        for _ in range(50):
            ts = np.concatenate([[0.0], np.cumsum(rng.uniform(0.1, 1.0, 8))])
            ts /= ts[-1]
            costs = rng.uniform(0.01, 10.0, 8)
            new = so.update_schedule(ts, costs)
            assert new[0] == 0.0 and new[-1] == 1.0 and np.all(np.diff(new) > 0)
            assert np.allclose(so.update_schedule(ts, 7.3 * costs), new)                 # scale invariance
            assert np.allclose(so.update_schedule(ts, np.full(8, 2.0)), ts)               # equal costs: fixed point
            assert so.path_length(costs) ** 2 <= so.path_energy(costs) * (1 + 1e-12)      # Cauchy-Schwarz
    """)


def test_the_cut_sampler_gives_the_exact_law_of_its_steps_on_a_gaussian(cut_folder):
    # With the exact score of N(0, lam) every Euler step is affine, x' = A x with A = a - b / var(t):
    # the sampler's output variance is the product of the A^2 times the prior variance, exactly.
    run_cut(cut_folder, """
        import numpy as np
        import scoreopt as so, sampler as sm
        p, lam = so.vp_linear(), 0.3
        score = lambda x, t: -x / (p.s(t) ** 2 * lam + p.sigma(t) ** 2)
        ts = so.edm_schedule(p, 12)
        var = float(sm.prior_variance(p, [lam])[0])
        for t_cur, t_next in zip(ts[:0:-1], ts[-2::-1]):
            a, b = so.ddim_coefficients(p, t_cur, t_next)
            var *= (a - b / (p.s(t_cur) ** 2 * lam + p.sigma(t_cur) ** 2)) ** 2
        x = sm.sample(score, p, ts, sm.prior_sample(p, 200_000, [lam], 0), 1).x
        assert abs(x.var() / var - 1) < 4 * np.sqrt(2 / 200_000), (x.var(), var)
    """)


def test_the_cut_sampler_names_the_time_and_the_step_of_a_score_that_raises(cut_folder):
    run_cut(cut_folder, """
        import numpy as np
        import scoreopt as so, sampler as sm
        p = so.ve()
        def broken(x, t):
            if t < 0.5:
                raise KeyError("weights missing")
            return -x / (1.0 + p.sigma(t) ** 2)
        try:
            sm.sample(broken, p, so.uniform_schedule(p, 4), sm.prior_sample(p, 3, [1.0], 0), 1)
        except so.ScoreEvaluationError as err:
            assert "`score` raised KeyError at t = 0.25" in str(err) and "(step 4 of 4" in str(err), str(err)
            assert isinstance(err.__cause__, KeyError)
        else:
            raise AssertionError("no error")
    """)


def test_the_cut_modules_train_with_the_online_update(cut_folder):
    run_cut(cut_folder, """
        import numpy as np
        import scoreopt as so, models
        p, target = so.vp_linear(), models.bimodal()
        online = models.OnlineSchedule(every=20, burn_in=40, gamma=0.5, n_samples=400)
        state = models.train(models.init_mlp(0, width=32), target, p, so.uniform_schedule(p, 10), rng=0,
                             n_steps=100, batch_size=128, lr=5e-3, online=online)
        costs = state.history["costs"]
        assert len(state.history["update_step"]) == 4 and np.all(np.diff(state.ts) > 0)
        assert np.all(np.isfinite(state.history["loss"]))
        spread = lambda c: np.ptp(np.log(c))
        assert spread(costs[-1]) < spread(costs[0])        # Algorithm 2 moves the costs towards equal
    """)


def test_the_cut_algorithm_2_with_exact_scores_reaches_the_closed_form_schedule(cut_folder):
    # Algorithm 2 by Part I's default route (dense grid, Theorem 3.1), exact score of N(0, 0.5^2) under ve(),
    # 30 updates with gamma = 0.5 from the uniform schedule: every level within 2% of the closed form
    # Lambda(sigma) = 2 [asinh(sigma/c) - sigma / sqrt(c^2 + sigma^2)] (docs/derivations.md, 1 and 4).
    run_cut(cut_folder, """
        import numpy as np
        from scipy.optimize import brentq
        import scoreopt as so
        p, c, T = so.ve(), 0.5, 10
        score = lambda x, t: -x / (c ** 2 + p.sigma(t) ** 2)
        rng, ts = np.random.default_rng(0), so.uniform_schedule(p, T)
        for _ in range(30):
            ts = so.online_update(score, p, ts, c * rng.standard_normal((1000, 1)), rng, gamma=0.5).ts
        L = lambda s: 2 * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
        exact = [brentq(lambda s: L(s) - L(0.002) - i / T * (L(80.0) - L(0.002)), 0.002, 80.0) for i in range(1, T)]
        sigmas = so.nsr(p, ts)[1:-1]
        assert np.allclose(sigmas, exact, rtol=0.02), (sigmas, exact)
        # and Part I's own closed form gives the same exact answer
        grid = so.time_from_nsr(p, np.geomspace(0.002, 80.0, 4001))
        Lambda = so.cumulative_cost(grid, so.gaussian_local_cost(p, grid, [c ** 2]))
        assert abs(Lambda[-1] / (L(80.0) - L(0.002)) - 1) < 1e-4
    """)


def test_the_cut_modules_docstring_examples_run(cut_folder):
    out = run_cut(cut_folder, """
        import doctest
        import scoreopt, sampler, models
        total = 0
        for m in (scoreopt, sampler, models):
            result = doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
            assert result.failed == 0, (m.__name__, result)
            total += result.attempted
        print(total)
    """)
    assert int(out) > 50


def _parts(name):
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        text = f.read()
    cut = text.index("\n# PART II") + 1
    return text[:cut], text[cut:]


def _defined(source):
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def test_no_line_of_part_one_names_anything_that_only_part_two_defines():
    # Part II's names (functions, classes, constants of all three modules, less those Part I defines too, such as
    # the wrappers `sample` and `train`) must not occur in Part I's code, strings, docstrings or comments.
    part_one = {name: _parts(name)[0] for name in MODULES}
    part_two_names = set().union(*(_defined(_parts(name)[1]) for name in MODULES))
    part_two_names -= set().union(*(_defined(source) for source in part_one.values())) | {"__all__"}
    assert {"estimate_schedule_map", "heun_step", "rowwise_score", "checkpointer", "ALL_PREDICTORS"} <= part_two_names
    found = []
    for name, source in part_one.items():
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT):
                for word in sorted(set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", token.string)) & part_two_names):
                    found.append(f"{name}.py:{token.start[0]}: {word}")
    assert not found, found


def test_part_two_never_writes_into_part_one():
    # Part II passes its choices into Part I as functions; it never changes a dict of Part I at import.
    for name in MODULES:
        one, two = _parts(name)
        dicts = {n for n in _defined(one) if n.isupper()}
        for node in ast.walk(ast.parse(two)):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                assert getattr(node.value, "id", None) not in dicts, (name, ast.unparse(node))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert not (getattr(node.func.value, "id", None) in dicts and node.func.attr in
                            ("update", "setdefault", "pop", "clear")), (name, ast.unparse(node))


def test_part_one_imports_nothing_it_does_not_use():
    # What pyflakes would say of a cut copy: every name Part I imports is used in Part I.
    for name in MODULES:
        tree = ast.parse(_parts(name)[0])
        imported = {alias.asname or alias.name.split(".")[0]: node.lineno for node in tree.body
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not set(imported) - used, (name, sorted(set(imported) - used))
