"""Hypothesis profiles: deterministic by default so that CI never flakes.

``HYPOTHESIS_PROFILE=explore`` runs more, randomised examples locally. One BLAS thread per
process, set before NumPy loads: the arrays here are small, and the examples' quick runs
train two models side by side in two processes, which several BLAS threads each would
oversubscribe on two cores.
"""
import os

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
