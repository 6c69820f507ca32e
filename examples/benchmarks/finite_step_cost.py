"""Exact finite-step corrector cost of the optimised schedule against the baselines.

For data N(0, c^2) the finite-step cost sum_i L_c(t_{i+1}, t_i) has a closed form
(`retired.gaussian_corrector_cost`, derived: docs/derivations.md, section 1; it left the
library, and lives beside this script), so the comparison has no Monte-Carlo error. Prints a
Markdown table of cost(optimised) / cost(best baseline).

    python examples/benchmarks/finite_step_cost.py
    python examples/benchmarks/finite_step_cost.py --quick    # T = 5 and 20, two data scales, a coarser grid
"""
import argparse
import os
import sys

import numpy as np

import scoreopt as so

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # retired.py, beside this script
import retired  # noqa: E402

STEPS = (5, 10, 20, 50, 100)
STDS = (0.1, 0.5, 2.0)
N_GRID = 20000
QUICK = dict(steps=(5, 20), stds=(0.1, 2.0), n_grid=2000)


def total_cost(process, ts, c):
    return retired.gaussian_corrector_cost(process, ts[1:], ts[:-1], [c ** 2]).sum()


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and data scales, a coarser grid")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else dict(steps=STEPS, stds=STDS, n_grid=N_GRID)
    log("| process | c | " + " | ".join(f"T = {T}" for T in cfg["steps"]) + " |")
    log("|---|---|" + "---|" * len(cfg["steps"]))
    table = {}
    for name, process in [("ve", so.ve()), ("vp_linear", so.vp_linear())]:
        nu_min, nu_max = so.nsr(process, [process.t_min, process.t_max])
        grid = so.time_from_nsr(process, np.geomspace(nu_min, nu_max, cfg["n_grid"]))
        for c in cfg["stds"]:
            delta = so.gaussian_local_cost(process, grid, [c ** 2])
            cells = []
            for T in cfg["steps"]:
                opt = total_cost(process, so.optimal_schedule(grid, delta, T), c)
                costs = {k: total_cost(process, v, c) for k, v in so.baseline_schedules(process, T, c).items()}
                best = min(costs, key=costs.get)
                table[name, c, T] = (opt / costs[best], best)
                cells.append(f"{opt / costs[best]:.2f} ({best})")
            log(f"| {name} | {c} | " + " | ".join(cells) + " |")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
