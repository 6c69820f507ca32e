"""The examples run end to end in --quick mode and show what they claim (issue: examples); every
script in ``examples/`` and ``examples/benchmarks/`` imports, shows ``--help``, and uses only
library names and keywords that exist.

Each tutorial's ``main(argv, log)`` returns the numbers it prints; the checks below are the
qualitative claims of each tutorial, on those numbers. The benchmarks are never run here (their
``--quick`` runs take minutes): the ``--help`` run and the check of every ``so.name(keyword=...)``
they write against the library are what make a renamed API break a test.
"""
import ast
import glob
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import models
import sampler
import scoreopt

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
EXAMPLES = os.path.join(ROOT, "examples")
BENCHMARKS = os.path.join(EXAMPLES, "benchmarks")
TUTORIALS = sorted(glob.glob(os.path.join(EXAMPLES, "*.py")))
BENCHMARK_SCRIPTS = sorted(p for p in glob.glob(os.path.join(BENCHMARKS, "*.py")) if not p.endswith("retired.py"))
SCRIPTS = TUTORIALS + BENCHMARK_SCRIPTS
OPTIONAL = {"torch": "PyTorch"}      # a script that needs one of these may exit at import when it is missing


def run_example(name, tmp_path, figures=True):
    """The tutorial ``examples/<name>.py`` imported as the module ``name`` (``examples/`` on ``sys.path``,
    so that the processes of a spawn-context pool, which inherit ``sys.path``, can import it too) and run
    with ``--quick``."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    module = importlib.import_module(name)
    lines = []
    out = module.main(["--quick", "--out", str(tmp_path)], log=lines.append)
    text = "\n".join(lines)
    # Figures: written when matplotlib is there, otherwise the script says how to get them.
    if figures and out["figures"]:
        assert all(os.path.getsize(p) > 10_000 and p.endswith(".png") for p in out["figures"])
    elif figures:
        assert "pip install -e '.[examples]'" in text
    return out, text


def test_cantor_linear_schedule_misses_modes_that_the_optimised_one_fills(tmp_path):
    out, text = run_example("cantor", tmp_path)
    exact = out["exact"]
    # With exact scores (the schedule's effect alone), T = 20 ancestral steps:
    assert exact["optimised"]["modes"] == 8 and exact["linear"]["modes"] <= 2
    assert exact["optimised"]["w1"] < 0.5 * exact["linear"]["w1"]
    assert exact["optimised"]["mass"] > exact["linear"]["mass"] + 0.3
    lam, se = exact["Lambda"]
    assert 0 < se < 0.01 * lam
    # The trained models ran with the same budget: with EDM's preconditioning no sample escapes
    # (with noise prediction, 15 of 20,000 did at the default budget: README), and the
    # optimised model is closer to p_0 than the linear one.
    trained = out["trained"]
    assert trained["linear"]["escaped"] == trained["optimised"]["escaped"] == 0
    assert trained["optimised"]["w1"] < trained["linear"]["w1"]
    assert trained["optimised"]["mass"] > trained["linear"]["mass"]
    assert trained["optimised"]["per_level"].score_error.shape == (9,)
    # Each model was sampled on its own final schedule: the optimised one moved away from the linear one.
    assert not np.allclose(trained["optimised"]["ts"], trained["linear"]["ts"])
    assert all(r["seconds"] > 0 for r in (trained["linear"], trained["optimised"]))
    assert "| trained | optimised |" in text and "| exact | linear |" in text and "per noise level" in text


def test_bimodal_online_update_equalises_costs_and_both_routes_are_shown(tmp_path):
    out, text = run_example("bimodal", tmp_path)
    final = out["final"]
    assert set(final) == {"fixed linear", "online, intervals", "online, dense grid"}
    for route in ("online, intervals", "online, dense grid"):
        spread = final[route]["spread"]                 # (seeds, first / last update)
        assert spread.shape == (2, 2) and np.all(spread[:, 1] < 0.05 * spread[:, 0])   # costs move towards equal
    assert final["fixed linear"]["spread"] is None
    # Training curves: one point per evaluation, for every run and seed; error bars over seeds.
    assert all(len(curve) == 2 for curves in out["curves"].values() for curve in curves)
    for r in final.values():
        mean, se = r["score_error"]
        assert mean > 0 and 0 < se < mean and r["per_level"][0].shape == (13,)
    # Exact scores: both optimised schedules beat the linear one in W1.
    w1 = {name: r["w1"] for name, r in out["exact"].items()}
    assert w1["corrector-optimised"] < w1["linear"] and w1["predictor-optimised"] < w1["linear"]
    assert "Reference: mean log p0" in text and "per noise level" in text


def test_gaussian_schedules_recover_the_closed_form_and_the_rho_family(tmp_path):
    out, _ = run_example("gaussian_schedules", tmp_path)
    for r in out["recovery"].values():
        assert r["max_rel_error"] < 0.01
    lam, se, closed = out["Lambda"]
    assert abs(lam - closed) < 4.5 * se
    rho = [out["rho"][a] for a in sorted(out["rho"])]
    assert np.all(np.diff(rho) > 0)          # steeper spectra, larger best-fit rho
    for kl in out["kl"].values():             # exact KL falls with T for every rule
        assert np.all(np.diff(kl) < 0)


def test_pretrained_adapters_agree_and_the_exports_are_usable(tmp_path):
    out, text = run_example("pretrained", tmp_path, figures=False)
    ddpm = [r for key, r in out.items() if isinstance(key, tuple) and key[0] == "DDPM"]
    assert len(ddpm) == 3
    # The same model in three parametrisations gives the same map (same noise, exact adapters).
    lengths = [r["map"].length for r in ddpm]
    np.testing.assert_allclose(lengths, lengths[0], rtol=1e-6)
    for key, r in out.items():
        if isinstance(key, tuple):
            assert r["map"].n_evaluations <= 30_000 and os.path.exists(r["path"])
    # The recommended schedule for 10 calls is no worse than any candidate it measured (diffusers' own
    # spacings among them), and it is exported with exactly 10 calls in each consumer's format.
    best = out["recommended"]
    assert best.n_calls == 10 and len(best.ts) == 10 and best.name in best.candidates
    chosen = [row for row in best.table if row[0] == best.name][0]
    assert chosen[1] <= best.table[0][1] + chosen[2] and chosen[3] <= 1.0
    steps, sigmas, comfy, times = (out["exports"][k] for k in ("diffusers", "k-diffusion", "comfyui", "flow times"))
    assert len(steps["timesteps"]) == 10 and steps["timesteps"][0] == 999 and np.all(np.diff(steps["timesteps"]) < 0)
    assert sigmas.shape == (11,) and sigmas.dtype == np.float32 and sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0)
    assert comfy.endswith(", 0") and len(comfy.split(",")) == 11
    assert len(times) == 10 and times[0] == 1.0 and np.all(np.diff(times) < 0)
    assert "set_timesteps(**so.to_diffusers(" in text


def test_optimal_schedule_from_a_black_box_score_matches_the_closed_form():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    lines = []
    out = importlib.import_module("optimal_schedule").main(["--quick"], log=lines.append)
    for lam, se, closed, errors in out["gaussian"].values():
        assert abs(lam - closed) < 4.5 * se and max(errors) < 0.03
    totals = out["cantor"]                  # the optimised schedule has the least total corrector cost
    assert totals["optimised"] == min(totals.values()) and totals["optimised"] < 0.5 * totals["EDM rho=7"]
    assert "| c   | d |" in "\n".join(lines)


# --------------------------------------------------------------------------------
# Every script: --help, the library names and keywords it uses, its process pools
# --------------------------------------------------------------------------------

# Runs each script's `__main__` block with `--help` in one fresh interpreter (the imports shared, so
# that the check is fast; whatever a script sets process-wide stays in that interpreter).
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    buffer, sys.argv = io.StringIO(), [path, "--help"]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            runpy.run_path(path, run_name="__main__")
        code = "returned without exiting"
    except SystemExit as stop:
        code = stop.code
    except BaseException as err:
        code = f"{type(err).__name__}: {err}"
    out[path] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_pages():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, *SCRIPTS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.relpath(p, EXAMPLES) for p in SCRIPTS])
def test_every_script_imports_and_shows_help(path, help_pages):
    code, text = help_pages[path]
    missing = [name for module, name in OPTIONAL.items() if importlib.util.find_spec(module) is None]
    said = str(code) + text
    if code != 0 and missing and "pip install" in said and any(m in said for m in OPTIONAL):
        pytest.skip(f"{os.path.basename(path)} needs {', '.join(missing)}, not installed here")
    assert code == 0, f"{path} --help: exit {code!r}\n{text[-2000:]}"
    # "usage:" opens a line, not necessarily the first: a third-party import may warn before it
    assert re.search(r"^usage:", text, re.M) and "--help" in text and "--quick" in text, text[-2000:]


def library_modules():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return {"scoreopt": scoreopt, "sampler": sampler, "models": models, "retired": importlib.import_module("retired")}


def used_names(path):
    """``(module, name, keywords, line)`` for every ``alias.name`` (or ``from module import name``) a script
    writes against the library; ``keywords`` maps each keyword of a direct call ``alias.name(...)`` to what
    the library function it names passes it on to (a ``cost=`` or ``route=`` given by name), else None."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    modules = library_modules()
    alias, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found += [(node.module, a.name, {}, node.lineno) for a in node.names]

    def resolve(value):          # so.name, or a name of scoreopt.COSTS / ROUTES
        if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id in alias:
            return getattr(modules[alias[value.value.id]], value.attr, None)
        if isinstance(value, ast.Constant):
            return {**scoreopt.COSTS, **scoreopt.ROUTES}.get(value.value)
        return None
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias:
            call = calls.get(id(node))
            keywords = {k.arg: k.value for k in call.keywords if k.arg} if call else {}
            forward = next((resolve(keywords[k]) for k in ("cost", "route") if k in keywords), None)
            found.append((alias[node.value.id], node.attr, dict.fromkeys(keywords, forward), node.lineno))
    return found


def accepted_keywords(target, forward):
    """The keywords ``target`` accepts (those of ``forward`` too where it passes ``**options`` on), or None
    when that cannot be told."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if isinstance(target, type) and getattr(target, "_fields", None) is not None:
        return set(target._fields)                        # a NamedTuple (OnlineSchedule checks in __new__)
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return set(parameters)
    further = None if forward is None else accepted_keywords(forward, None)
    return None if further is None else set(parameters) | further


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.relpath(p, EXAMPLES) for p in SCRIPTS])
def test_every_library_name_and_keyword_a_script_uses_exists(path):
    modules, problems = library_modules(), []
    tutorial = path in TUTORIALS
    for module, name, keywords, line in used_names(path):
        where = f"{os.path.relpath(path, ROOT)}:{line}: {module}.{name}"
        if not hasattr(modules[module], name):
            problems.append(f"{where} does not exist")
            continue
        if tutorial and module != "retired" and name not in modules[module].__all__:
            problems.append(f"{where} is not in {module}.__all__ (a tutorial uses the documented API)")
        for keyword, forward in keywords.items():
            accepted = accepted_keywords(getattr(modules[module], name), forward)
            if accepted is not None and keyword not in accepted:
                problems.append(f"{where}(..., {keyword}=...): no such argument")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", TUTORIALS, ids=[os.path.basename(p) for p in TUTORIALS])
def test_tutorials_start_process_pools_by_spawn_or_forkserver_never_fork(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "get_context":
            method = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            assert method in ("spawn", "forkserver"), f"{path}:{node.lineno}: get_context({method!r})"
        elif name == "ProcessPoolExecutor":
            assert any(k.arg == "mp_context" for k in node.keywords), \
                f"{path}:{node.lineno}: a ProcessPoolExecutor without mp_context (the default is fork on Linux)"
        elif name == "Pool":
            assert isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call), \
                f"{path}:{node.lineno}: a Pool not made from get_context('spawn' or 'forkserver')"


def test_the_retired_rules_live_beside_the_benchmarks_only():
    retired = library_modules()["retired"]
    assert "docs/derivations.md" in retired.__doc__
    for name in retired.__all__:
        assert callable(getattr(retired, name)) and not hasattr(scoreopt, name) and not hasattr(sampler, name)
