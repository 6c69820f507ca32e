"""Closed forms for Gaussian data, used by the tests as oracles (docs/derivations.md, section 1).

For data ``N(mean, diag(variances))`` every marginal is Gaussian and the finite-step corrector and
DDIM-predictor costs have exact expressions (with ``v = sigma``); the Monte-Carlo estimates of
``scoreopt.corrector_cost`` and ``scoreopt.predictor_cost`` are checked against them. They left the
library (they were ``scoreopt.gaussian_corrector_cost`` and ``scoreopt.gaussian_predictor_cost``) and
live, once, in ``examples/benchmarks/retired.py``, with the other retired rules the benchmarks compare
against; this module loads them from there (:func:`load_benchmark`, which the benchmarks' tests use too).
"""
import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "benchmarks")


def load_benchmark(name):
    """``examples/benchmarks/<name>.py`` as the module ``<name>_for_tests`` (registered, so that its classes
    pickle), run from its file."""
    spec = importlib.util.spec_from_file_location(f"{name}_for_tests", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_retired = load_benchmark("retired")

gaussian_corrector_cost = _retired.gaussian_corrector_cost
gaussian_predictor_cost = _retired.gaussian_predictor_cost
