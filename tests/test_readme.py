"""The README's code runs as written: its first snippet, from a black-box score to the optimal schedule."""
import contextlib
import io
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_the_paper_in_code_snippet_runs_and_recovers_the_closed_form_length():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    code = re.search(r"## The paper in code.*?```python\n(.*?)```", text, re.S).group(1)
    out, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    length = float(out.getvalue().split()[0])
    # VE and N(0, c^2), d = 1: Lambda = 2 [asinh(s/c) - s / sqrt(c^2 + s^2)] between 0.002 and 80 (derivations, 1).
    L = lambda s, c=0.5: 2 * (np.arcsinh(s / c) - s / np.sqrt(c ** 2 + s ** 2))
    assert abs(length / (L(80.0) - L(0.002)) - 1) < 0.01
    schedule = namespace["schedule"]
    assert len(schedule) == 11 and schedule[0] == 0.0 and schedule[-1] == 1.0 and np.all(np.diff(schedule) > 0)
