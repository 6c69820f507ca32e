"""Closed forms for Gaussian data, used by the tests as oracles (docs/derivations.md, section 1).

For data ``N(mean, diag(variances))`` every marginal is Gaussian and the finite-step corrector and
DDIM-predictor costs have exact expressions (with ``v = sigma``); the Monte-Carlo estimates of
``scoreopt.corrector_cost`` and ``scoreopt.predictor_cost`` are checked against them. They left the
library (they were ``scoreopt.gaussian_corrector_cost`` and ``scoreopt.gaussian_predictor_cost``) and
live, once, in ``examples/benchmarks/retired.py``, with the other retired rules the benchmarks compare
against; this module loads them from there.
"""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "benchmarks", "retired.py")
_spec = importlib.util.spec_from_file_location("retired_for_tests", _PATH)
_retired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_retired)

gaussian_corrector_cost = _retired.gaussian_corrector_cost
gaussian_predictor_cost = _retired.gaussian_predictor_cost
