"""Every docstring example (``>>>``) runs and prints what it says, in every module.

The examples are part of the specification a reader meets first, so they are tests: each
docstring with an example is one test case here, found by ``doctest``'s own finder.
"""
import doctest

import pytest

import models
import sampler
import scoreopt

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
CASES = [test for module in (scoreopt, sampler, models)
         for test in doctest.DocTestFinder(exclude_empty=True).find(module) if test.examples]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_docstring_example_runs_as_written(case):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(case)
    assert runner.failures == 0, f"{case.name}: {runner.failures} of {len(case.examples)} examples failed"


def test_every_public_function_of_each_part_one_has_an_example():
    for module in (scoreopt, sampler, models):
        with open(module.__file__, encoding="utf-8") as f:
            part_one = f.read().split("\n# PART II")[0]
        names = [name for name in module.__all__ if f"\ndef {name}(" in part_one or f"\nclass {name}(" in part_one]
        missing = [name for name in names if callable(getattr(module, name)) and ">>>" not in
                   (getattr(module, name).__doc__ or "") and not isinstance(getattr(module, name), type)]
        assert not missing, f"{module.__name__}: Part I functions without a runnable example: {missing}"


def test_every_part_two_function_the_readme_or_a_guide_calls_has_an_example():
    import glob
    import os
    root = os.path.dirname(os.path.abspath(scoreopt.__file__))
    docs = "".join(open(p, encoding="utf-8").read()
                   for p in [os.path.join(root, "README.md")] + glob.glob(os.path.join(root, "docs", "guide", "*.md")))
    missing = []
    for module in (scoreopt, sampler, models):
        with open(module.__file__, encoding="utf-8") as f:
            part_two = f.read().split("\n# PART II")[1]
        for name in module.__all__:
            if f"\ndef {name}(" in part_two and f"{name}(" in docs and ">>>" not in (getattr(module, name).__doc__ or ""):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"Part II functions that the docs call, without a runnable example: {missing}"
