"""Accuracy of the schedule map against its budget of score evaluations; writes docs/reports/budget.md.

For three targets with exact scores under `vp_linear` (a 64-d Gaussian with spectrum
k^-1.5, a Cantor variant, `mollified_cantor(level=3, width=0.01, interval=(-1, 1))`, and
the bimodal target), and for a trained model (a 3x64 MLP trained on that Cantor variant,
EDM preconditioning), and several budgets of per-sample score evaluations,
`estimate_schedule_map(..., budget=N)` is run with SEEDS independent seeds, with and
without the Gaussian control variate, and with grids of several sizes. Reported, for
T = 10 and T = 50:

- spread: the largest relative standard deviation over seeds of the levels nu_i
  (the issue's measure of precision);
- bias: the largest relative error of the seeds' mean nu_i against a reference map
  (REFERENCE_BUDGET evaluations on 1,000 levels), which the spread does not see;
- coverage: the fraction of seeds whose Lambda lies within 1.96 reported standard
  errors of the reference Lambda (nominal 0.95; the reference's own error is small),
  with the Monte-Carlo standard error alone and with `length_uncertainty`, which adds the
  grid (quadrature) error; and the fraction whose `length_interval(0.95)` (the same with
  the Student-t quantile of the batch means) holds the reference.

    python examples/benchmarks/budget_benchmark.py           # about 10 minutes on 2 cores
    python examples/benchmarks/budget_benchmark.py --quick   # a smoke run (3 seeds, one budget), prints only
"""
import argparse
import os
import sys
import time

import numpy as np

import models
import scoreopt as so

SEEDS = 12
BUDGETS = (30_000, 100_000, 300_000, 1_000_000)
GRIDS = (None, 20, 100)            # None: the budget's own choice, sqrt(budget / 40) levels
REFERENCE_BUDGET = 16_000_000
STEPS = (10, 50)
TRAIN_STEPS = 6000                 # the trained MLP's budget
QUICK = dict(names=("cantor", "cantor, trained MLP"), budgets=(30_000,), grids=(None,), seeds=3,
             reference_budget=500_000, train_steps=300)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "reports", "budget.md")


def targets():
    return {"gaussian-64d": models.Gaussian(np.zeros(64), np.arange(1, 65) ** -1.5),
            "cantor": models.mollified_cantor(level=3, width=0.01, interval=(-1, 1)),
            "bimodal": models.bimodal(), "cantor, trained MLP": None}


class Trained:
    """A trained model standing in for a user's: its score, and the data it was trained on."""

    def __init__(self, process, n_steps):
        self.data = models.mollified_cantor(level=3, width=0.01, interval=(-1, 1))
        state = models.train(models.init_mlp(0, width=64, depth=3), self.data, process,
                             so.loglinear_schedule(process, 64), rng=0, n_steps=n_steps, batch_size=256, lr=5e-3,
                             levels="between")
        self.model = state.score(process)

    def score(self, x, t, process):
        return self.model(x, t)

    def sample(self, n, rng):
        return self.data.sample(n, rng)


def estimate(target, process, budget, seed, n_grid, control_variate):
    score = lambda x, t: target.score(x, t, process)
    x0 = target.sample(budget // 40 + 100, seed)        # more rows than any setting uses
    if n_grid is None:
        return so.estimate_schedule_map(score, process, x0, 1000 + seed, budget=budget,
                                        control_variate=control_variate)
    n = budget // (2 * n_grid + 2)
    return so.estimate_schedule_map(score, process, x0[:n], 1000 + seed, n_grid=n_grid,
                                    control_variate=control_variate)


def row(name, target, process, reference, budget, n_grid, control_variate, seeds):
    begin = time.perf_counter()
    maps = [estimate(target, process, budget, seed, n_grid, control_variate) for seed in range(seeds)]
    cells = []
    for T in STEPS:
        nu = np.array([so.nsr(process, m.schedule(T)) for m in maps])[:, 1:-1]
        ref = so.nsr(process, reference.schedule(T))[1:-1]
        spread = np.max(nu.std(axis=0, ddof=1) / nu.mean(axis=0))
        bias = np.max(np.abs(nu.mean(axis=0) / ref - 1))
        cells += [f"{100 * spread:.2f}%", f"{100 * bias:.2f}%"]
    covered = np.mean([abs(m.length - reference.length) < 1.96 * m.length_stderr for m in maps])
    with_grid = np.mean([abs(m.length - reference.length) < 1.96 * m.length_uncertainty for m in maps])
    interval = np.mean([m.length_interval(0.95)[0] < reference.length < m.length_interval(0.95)[1] for m in maps])
    error = np.mean([m.length for m in maps]) / reference.length - 1
    grid = maps[0].metadata["n_grid"]
    return (f"| {name} | {budget:,} | {grid}{'' if n_grid else ' (auto)'} | {maps[0].metadata['n_samples']} | "
            f"{'yes' if control_variate else 'no'} | " + " | ".join(cells) +
            f" | {100 * error:+.2f}% | {covered:.2f} / {with_grid:.2f} / {interval:.2f} | {max(m.n_evaluations for m in maps):,} | "
            f"{(time.perf_counter() - begin) / seeds:.2f} s |")


def run(names, budgets, grids, seeds=SEEDS, reference_budget=REFERENCE_BUDGET, train_steps=TRAIN_STEPS):
    process = so.vp_linear()
    lines = []
    for name in names:
        target = targets()[name] or Trained(process, train_steps)
        score = lambda x, t: target.score(x, t, process)
        n = reference_budget // 2002
        reference = so.estimate_schedule_map(score, process, target.sample(n, 999), 999, n_grid=1000)
        print(f"{name}: reference Lambda {reference.length:.4f} ± {reference.length_stderr:.4f}", flush=True)
        for budget in budgets:
            for n_grid in grids:
                for cv in (False, True):
                    lines.append(row(name, target, process, reference, budget, n_grid, cv, seeds))
                    print(lines[-1], flush=True)
    header = ["| target | budget | levels | samples | control variate | spread T=10 | bias T=10 | "
              "spread T=50 | bias T=50 | Λ mean error | Λ coverage: 1.96 s.e. / 1.96 with grid error / length_interval | "
              "evaluations used | "
              "seconds per map |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(header + lines + [""] + coverage_summary(lines, seeds))


def coverage_summary(lines, seeds):
    """Pooled coverage of Lambda by its 95% error bar, per target, over every row's seeds."""
    out = ["Pooled over every row of a target (nominal 0.95; the standard error of a pooled fraction "
           "of N seeds is about sqrt(0.95 x 0.05 / N)):", "",
           "| target | seeds | 1.96 Monte-Carlo s.e. | 1.96 with the grid error | `length_interval(0.95)` |",
           "|---|---|---|---|---|"]
    pooled = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        pooled.setdefault(cells[0], []).append([float(v) for v in cells[10].split("/")])
    for name, values in pooled.items():
        out.append(f"| {name} | {seeds * len(values)} | " + " | ".join(f"{v:.3f}" for v in np.mean(values, axis=0)) + " |")
    return out


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (one budget, 3 seeds, small reference "
                                                             "maps, a short training); prints only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        text = run(**QUICK)
    else:
        table = run(list(targets()), BUDGETS, GRIDS)
        text = ("# Schedule map: accuracy against the budget of score evaluations\n\n"
                "Made by `python examples/benchmarks/budget_benchmark.py` (see its docstring for the protocol; "
                f"{SEEDS} seeds per row, `vp_linear`; exact scores, and in the last rows a trained MLP's).\n\n" + table +
                f"\n\nTotal time: {time.perf_counter() - start:.0f} s.\n")
        so.write_atomically(OUT, text)
    log(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
