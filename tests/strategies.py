"""Hypothesis strategies for valid (and invalid) schedules and costs.

Valid inputs are built directly (cumulative sums of positive steps) rather than
filtered, so every draw is used.
"""
import numpy as np
from hypothesis import strategies as st

import scoreopt

PROCESSES = {
    "ve": scoreopt.ve(),
    "vp_linear": scoreopt.vp_linear(),
    "vp_cosine": scoreopt.vp_cosine(),
    "ve_narrow": scoreopt.ve(sigma_min=0.01, sigma_max=5.0),
}

processes = st.sampled_from(sorted(PROCESSES)).map(PROCESSES.get)
steps = st.integers(min_value=1, max_value=200)
positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def schedules(draw, min_steps=1, max_steps=60, lo=0.0, hi=1.0):
    """Strictly increasing times from ``lo`` to ``hi`` (exact endpoints)."""
    n = draw(st.integers(min_value=min_steps, max_value=max_steps))
    w = np.array(draw(st.lists(positive, min_size=n, max_size=n)))
    ts = lo + (hi - lo) * np.concatenate([[0.0], np.cumsum(w) / np.sum(w)])
    ts[-1] = hi
    return ts


def costs(n, allow_zero=True):
    """Arrays of ``n`` finite non-negative costs, some possibly zero."""
    elem = st.one_of(st.just(0.0), positive) if allow_zero else positive
    return st.lists(elem, min_size=n, max_size=n).map(np.array)


@st.composite
def schedules_with_costs(draw, allow_zero=True):
    ts = draw(schedules())
    return ts, draw(costs(len(ts) - 1, allow_zero).filter(lambda c: np.max(c) > 0))


@st.composite
def broken_schedules(draw):
    """1-D arrays that are not schedules: a repeated or decreasing time, or a non-finite one."""
    ts = draw(schedules(min_steps=2))
    i = draw(st.integers(min_value=1, max_value=len(ts) - 2))
    kind = draw(st.sampled_from(["repeat", "swap", "nan", "inf"]))
    ts = ts.copy()
    if kind == "repeat":
        ts[i] = ts[i - 1]
    elif kind == "swap":
        ts[i], ts[i + 1] = ts[i + 1], ts[i]
    else:
        ts[i] = np.nan if kind == "nan" else np.inf
    return ts
