"""Every Python block of the README and of docs/guide/ runs as written.

A block runs alone in a fresh namespace, or names the setup it needs in a line
``# needs: <label> (<page>)``, where <page> has a block whose first line is ``# setup: <label>``;
the setup runs first (and a setup may need another, which runs before it). A block that imports torch, k_diffusion, diffusers, dask or ray is skipped,
saying which, when that package is not installed. The fast path: the sizes in ``FAST`` (more
steps, samples or levels than a test needs) are replaced before the block runs; each replacement
must find its text, so that it cannot silently stop applying.
"""
import contextlib
import glob
import importlib.util
import io
import os
import re

import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "guide", "*.md")))
OPTIONAL = ("torch", "k_diffusion", "diffusers", "dask", "ray")
FAST = {                      # page: [(text as written, the size a test needs)]
    "docs/guide/schedules.md": [("target.sample(4000, 0), rng=1)", "target.sample(400, 0), rng=1, n_grid=60)"),
                                ("p, 20_000, [0.25], 0)", "p, 1_000, [0.25], 0)"), ("in (1, 10, 100):", "in (1, 10):")],
    "docs/guide/training.md": [("n_steps=9000", "n_steps=30"),
                               ("every=500, burn_in=1500", "every=10, burn_in=20, n_samples=100")],
    "docs/guide/sampling.md": [("10_000, target.variance()", "1_000, target.variance()"),
                               ("target.sample(2000, 0)", "target.sample(300, 0)")],
    "docs/guide/scaling.md": [("target.sample(2000, 0)", "target.sample(100, 0)")],
    "docs/guide/your-model.md": [("budget=100_000", "budget=20_000"), ("(5000, *image_shape)", "(500, *image_shape)")],
}


def blocks():
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            found.append((page, text[:match.start()].count("\n") + 1, match.group(1)))
    return found


BLOCKS = blocks()
SETUPS = {(page, code.splitlines()[0][len("# setup: "):].strip()): code
          for page, _, code in BLOCKS if code.startswith("# setup: ")}


def fast(page, code):
    for written, small in FAST.get(page, ()):
        code = code.replace(written, small)
    return code


def missing_packages(code):
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M))
    imported |= {name for line in re.findall(r"^\s*import\s+(.+)$", code, re.M) for name in re.findall(r"\w+", line)}
    return sorted(name for name in imported & set(OPTIONAL) if importlib.util.find_spec(name) is None)


def test_the_fast_path_finds_every_text_it_replaces():
    for page, replacements in FAST.items():
        code = "".join(c for p, _, c in BLOCKS if p == page)
        for written, _ in replacements:
            assert written in code, f"{page}: the fast path's {written!r} is no longer in a block"


def needed(code):
    """The setups a block needs, as ``(code, page)``, the first to run first."""
    need = re.search(r"^# needs: (.+?) \((.+?)\)", code, re.M)
    if need is None:
        return []
    setup = SETUPS[(need.group(2), need.group(1))]
    return needed(setup) + [(setup, need.group(2))]


def test_every_block_s_setup_exists():
    for page, line, code in BLOCKS:
        need = re.search(r"^# needs: (.+?) \((.+?)\)", code, re.M)
        if need:
            assert (need.group(2), need.group(1)) in SETUPS, f"{page}:{line} needs {need.group(1)!r} in {need.group(2)}"


@pytest.mark.filterwarnings("ignore:the equal-cost iteration did not converge")   # the fast path's few updates
@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_the_block_runs_as_written(page, line, code, tmp_path, monkeypatch):
    setups = needed(code)
    missing = missing_packages("".join(s for s, _ in setups) + code)
    if missing:
        pytest.skip(f"{page}:{line} uses {', '.join(missing)}, not installed here")
    monkeypatch.chdir(tmp_path)                     # files a block writes (a checkpoint, a map) go here
    namespace = {"__name__": "docs_block"}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for part, where in setups + [(code, page)]:
            exec(compile(fast(where, part), f"{where}:{line}", "exec"), namespace)
